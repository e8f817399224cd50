//! Evaluating the diagnosis on labelled denials (the format of
//! `../shared/corpus`, copied under `tests/corpus/`): each sample is a
//! response with its true cause; the request is unknown, so request-side
//! detectors stay silent.

use std::path::Path;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use serde::Deserialize;

use crate::config::Config;
use crate::explanation::Explanation;
use crate::facts::RequestFacts;
use crate::id::DenialId;
use crate::policy::Upstream;

/// One labelled sample.
#[derive(Debug, Deserialize)]
pub struct Sample {
    /// Its id.
    pub id: String,
    /// The status.
    pub status: u16,
    /// The status line, when its reason phrase carries information.
    #[serde(default)]
    pub status_line: Option<String>,
    /// The headers (a value or a list of values).
    #[serde(default)]
    pub headers: Option<serde_json::Map<String, serde_json::Value>>,
    /// The body.
    #[serde(default)]
    pub body: String,
    /// The truth.
    pub labels: Labels,
}

/// The truth about a sample.
#[derive(Debug, Deserialize)]
pub struct Labels {
    /// The cause.
    pub cause: String,
    /// Whether the identical request would succeed later.
    pub temporary: bool,
    /// Whether the bytes alone reveal the cause.
    #[serde(default = "yes")]
    pub inferable_from_response: bool,
}

fn yes() -> bool {
    true
}

/// A prediction next to its label.
#[derive(Debug)]
pub struct Row {
    /// The sample id.
    pub id: String,
    /// The labelled cause.
    pub label: String,
    /// The predicted top cause.
    pub predicted: String,
    /// The labelled temporary flag.
    pub label_temporary: bool,
    /// The predicted one.
    pub predicted_temporary: bool,
    /// Whether the cause is inferable from the response.
    pub inferable: bool,
}

/// The evaluation of a corpus.
#[derive(Debug, Default)]
pub struct Report {
    /// One row per sample.
    pub rows: Vec<Row>,
}

impl Report {
    /// (right, total) top causes among the inferable samples.
    pub fn cause_accuracy(&self) -> (usize, usize) {
        let inferable: Vec<&Row> = self.rows.iter().filter(|r| r.inferable).collect();
        let right = inferable.iter().filter(|r| r.label == r.predicted).count();
        (right, inferable.len())
    }

    /// (right, total) temporary flags among all samples.
    pub fn temporary_accuracy(&self) -> (usize, usize) {
        let right = self
            .rows
            .iter()
            .filter(|r| r.label_temporary == r.predicted_temporary)
            .count();
        (right, self.rows.len())
    }

    /// The table, the accuracy and the misses, as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut out = String::from(
            "| sample | label | predicted | temporary (label / predicted) | inferable |\n| --- | --- | --- | --- | --- |\n",
        );
        for r in &self.rows {
            let mark = if r.label == r.predicted { "" } else { " ✗" };
            out.push_str(&format!(
                "| {} | {} | {}{} | {} / {} | {} |\n",
                r.id,
                r.label,
                r.predicted,
                mark,
                r.label_temporary,
                r.predicted_temporary,
                if r.inferable { "yes" } else { "no" }
            ));
        }
        let (right, total) = self.cause_accuracy();
        let (tr, tt) = self.temporary_accuracy();
        out.push_str(&format!(
            "\nTop cause right on {right} of {total} inferable samples ({:.1}%); temporary right on {tr} of {tt}.\n",
            100.0 * right as f64 / total.max(1) as f64
        ));
        let misses: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.inferable && r.label != r.predicted)
            .collect();
        if !misses.is_empty() {
            out.push_str("Misses: ");
            out.push_str(
                &misses
                    .iter()
                    .map(|r| format!("{} ({} → {})", r.id, r.label, r.predicted))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            out.push('\n');
        }
        out
    }
}

/// Explains a bare response (no request seen).
pub fn explain_response(
    config: &Config,
    status: StatusCode,
    reason: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Explanation {
    let req = Request::get("/").body(()).unwrap_or_default();
    let mut facts = RequestFacts::capture(&req, config);
    facts.assume_unknown_credentials();
    let upstream = Upstream {
        status,
        headers,
        body,
        reason,
    };
    crate::diagnose::explain(
        config,
        &facts,
        &upstream,
        DenialId::random().unwrap_or_else(|_| DenialId::from_bytes([0; 16])),
        SystemTime::now(),
    )
}

/// Reads one sample file.
pub fn read_sample(path: &Path) -> Result<Sample, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The headers of a sample.
pub fn sample_headers(sample: &Sample) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in sample.headers.iter().flatten() {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        let values: Vec<String> = match value {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().unwrap_or("").to_owned())
                .collect(),
            serde_json::Value::String(s) => vec![s.clone()],
            other => vec![other.to_string()],
        };
        for v in values {
            if let Ok(v) = HeaderValue::from_str(&v) {
                map.append(name.clone(), v);
            }
        }
    }
    map
}

/// Evaluates every `*.yaml` sample in `dir`.
pub fn evaluate(config: &Config, dir: &Path) -> Result<Report, String> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    paths.sort();
    let mut report = Report::default();
    for path in paths {
        let sample = read_sample(&path)?;
        let headers = sample_headers(&sample);
        let reason = sample
            .status_line
            .as_deref()
            .and_then(|l| l.split_once(' ').map(|(_, r)| r.to_owned()));
        let status =
            StatusCode::from_u16(sample.status).map_err(|e| format!("{}: {e}", sample.id))?;
        let body = Bytes::from(sample.body.clone());
        let e = explain_response(config, status, reason.as_deref(), &headers, &body);
        report.rows.push(Row {
            id: sample.id,
            label: sample.labels.cause,
            predicted: e.top_cause().as_str().to_owned(),
            label_temporary: sample.labels.temporary,
            predicted_temporary: e.temporary,
            inferable: sample.labels.inferable_from_response,
        });
    }
    Ok(report)
}
