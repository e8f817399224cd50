//! Loading configs: the shipped example, and every kind of bad config with its
//! location.

use super::compile::parse_duration;
use super::*;

fn err(yaml: &str) -> ConfigError {
    match Config::from_yaml_str(yaml) {
        Ok(_) => panic!("config was accepted:\n{yaml}"),
        Err(e) => e,
    }
}

fn assert_err(yaml: &str, line: u64, column: u64, needle: &str) {
    let e = err(yaml);
    assert_eq!(e.location(), Some((line, column)), "{e}");
    assert!(
        e.to_string().contains(needle),
        "expected {needle:?} in:\n{e}"
    );
}

#[test]
fn the_shipped_config_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/whydenied.yaml");
    let config = Config::from_file(path).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.policies().len() >= 5);
    assert_eq!(config.intercepted(), vec![401, 403, 429, 451]);
}

#[test]
fn defaults() {
    let c = Config::from_yaml_str("").unwrap();
    assert_eq!(c.intercepted(), vec![403]);
    assert_eq!(c.max_body_bytes(), 64 * 1024);
    assert!(c.policies().is_empty());
    assert!(c.intercepts(http::StatusCode::FORBIDDEN));
    assert!(!c.intercepts(http::StatusCode::OK));
    assert!(!c.intercepts(http::StatusCode::UNAUTHORIZED));
    let d = Config::default();
    assert_eq!(d.intercepted(), vec![403]);
}

#[test]
fn unknown_keys_with_did_you_mean() {
    assert_err(
        "policies:\n  - id: a\n    cause: permission\n    titel: x\n",
        4,
        5,
        "unknown field `titel`",
    );
    assert!(
        err("policies:\n  - id: a\n    cause: permission\n    titel: x\n")
            .to_string()
            .contains("did you mean `title`?")
    );
    assert!(
        err("intercpt: [403]\n")
            .to_string()
            .contains("did you mean `intercept`?")
    );
}

#[test]
fn bad_globs() {
    assert_err(
        "policies:\n  - id: a\n    cause: permission\n    match: { path: \"/a/[b\" }\n",
        4,
        20,
        "bad path glob",
    );
}

#[test]
fn bad_cidrs_and_unknown_networks() {
    assert_err("trusted_proxies: [10.0.0.0/33]\n", 1, 19, "not a CIDR");
    assert_err(
        "networks: { office: [192.0.2.0/24, nope] }\n",
        1,
        36,
        "`nope` is not a CIDR",
    );
    let e = err(
        "networks: { office: [192.0.2.0/24] }\npolicies:\n  - id: a\n    cause: ip_blocked\n    match: { client_in: [ofice] }\n",
    );
    assert!(
        e.to_string()
            .contains("unknown network `ofice` (did you mean `office`?)"),
        "{e}"
    );
}

#[test]
fn regexes_over_the_size_limit() {
    let yaml = "policies:\n  - id: a\n    cause: permission\n    match: { body: { regex: \"(\\\\w{50}){50}\" } }\n";
    let e = err(yaml);
    assert!(e.to_string().contains("compiles to more than"), "{e}");
    assert_eq!(e.location().map(|l| l.0), Some(4));
    let long = format!(
        "policies:\n  - id: a\n    cause: permission\n    match: {{ body: {{ regex: \"{}\" }} }}\n",
        "a".repeat(2000)
    );
    assert!(err(&long).to_string().contains("the limit is 1024"));
}

#[test]
fn too_many_body_literals_together() {
    // 200 policies whose bodies each need one of 16 literals: too many to
    // scan in one pass, refused with a clear message (a hostile config must
    // not make every denial slow).
    let mut yaml = String::from("policies:\n");
    for p in 0..200 {
        let alternatives: Vec<String> = (0..16).map(|a| format!("word{p}x{a}")).collect();
        yaml.push_str(&format!(
            "  - id: p{p}\n    cause: permission\n    match: {{ body: {{ regex: \"{}\" }} }}\n",
            alternatives.join("|")
        ));
    }
    let e = err(&yaml);
    assert!(e.to_string().contains("3200 distinct literals"), "{e}");
    assert!(e.to_string().contains("the limit is 2048"), "{e}");
    // Half as many load.
    let half: String = yaml
        .lines()
        .take(1 + 3 * 100)
        .collect::<Vec<_>>()
        .join("\n");
    let config = Config::from_yaml_str(&half).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.policies().len(), 100);
}

#[test]
fn unknown_causes() {
    assert_err(
        "policies:\n  - id: a\n    cause: permision\n",
        3,
        12,
        "unknown cause `permision` (did you mean `permission`?)",
    );
    assert!(
        err("policies:\n  - id: a\n")
            .to_string()
            .contains("has no `cause`")
    );
}

#[test]
fn duplicate_policy_ids() {
    assert_err(
        "policies:\n  - id: a\n    cause: permission\n  - id: a\n    cause: csrf\n",
        4,
        9,
        "duplicate policy id `a`: it is already used by the policy at line 2",
    );
}

#[test]
fn other_mistakes_are_located() {
    assert_err("intercept: [200]\n", 1, 13, "cannot intercept status 200");
    assert_err("max_body_kib: 0\n", 1, 15, "between 1 and 1024");
    assert_err(
        "policies:\n  - id: a\n    cause: permission\n    detail: \"{{ pth }}\"\n",
        4,
        13,
        "did you mean `path`?",
    );
    assert_err(
        "policies:\n  - id: a\n    cause: permission\n    match: { status: [429] }\n",
        4,
        23,
        "status 429 is not intercepted",
    );
    assert_err(
        "policies:\n  - id: a\n    cause: permission\n    match: { headers: { x-a: { present: true, equals: b } } }\n",
        4,
        30,
        "exactly one of",
    );
    assert_err("upstream: ftp://x\n", 1, 11, "`upstream` must be");
    assert_err(
        "policies:\n  - id: a\n    cause: permission\n    docs: javascript:alert(1)\n",
        4,
        11,
        "absolute http",
    );
    assert_err(
        "policies:\n  - id: \"a b\"\n    cause: permission\n",
        2,
        9,
        "policy id",
    );
    let e = err("policies: [\n");
    assert!(e.location().is_some(), "{e}");
}

#[test]
fn errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("whydenied-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(&path, "policies:\n  - id: a\n    cause: nope\n").unwrap();
    let e = Config::from_file(&path).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}:3:12: unknown cause", path.display())),
        "{e}"
    );
    assert!(e.to_string().contains("3 |     cause: nope"), "{e}");
    let missing = Config::from_file(dir.join("missing.yaml")).unwrap_err();
    assert!(missing.to_string().contains("cannot read config file"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hostile_yaml_is_refused_not_expanded() {
    // A billion-laughs style alias bomb must be refused by the parser budget.
    let mut yaml = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = i - 1;
        yaml.push_str(&format!(
            "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
        ));
    }
    assert!(Config::from_yaml_str(&yaml).is_err());
}

#[test]
fn too_many_captured_headers() {
    let mut yaml = String::from("policies:\n");
    for i in 0..9 {
        yaml.push_str(&format!(
            "  - id: p{i}\n    cause: permission\n    match: {{ headers: {{ x-h{i}: {{ present: true }} }} }}\n"
        ));
    }
    assert!(
        err(&yaml)
            .to_string()
            .contains("more than 8 distinct request headers")
    );
}

#[test]
fn limits_and_durations() {
    let c = Config::from_yaml_str(
        "limits: { header_read_timeout: 250ms, upstream_response_timeout: 2m, max_headers: 50, max_request_body_bytes: 1048576 }\n",
    )
    .unwrap();
    let l = c.limits();
    assert_eq!(l.header_read_timeout, std::time::Duration::from_millis(250));
    assert_eq!(
        l.upstream_response_timeout,
        std::time::Duration::from_secs(120)
    );
    assert_eq!(l.max_headers, 50);
    assert_eq!(l.max_request_body_bytes, Some(1 << 20));
    assert_eq!(l.max_connections, 4096);
    assert_err(
        "limits: { idle_timeout: 10 }\n",
        1,
        25,
        "must be a duration",
    );
    assert_err("limits: { max_header_bytes: 100 }\n", 1, 29, "between 8192");
    assert!(parse_duration("0s").is_none());
    assert!(parse_duration("2d").is_none());
    assert_eq!(
        parse_duration("1h"),
        Some(std::time::Duration::from_secs(3600))
    );
}

#[test]
fn the_builtin_signature_pack_compiles() {
    let pack = super::policies::compile_pack(BUILTIN_SIGNATURES, "config/signatures.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(pack.len() >= 40, "{} signatures", pack.len());
}

#[test]
fn the_kubernetes_example_config_loads() {
    #[derive(serde::Deserialize)]
    struct ConfigMap {
        data: std::collections::BTreeMap<String, String>,
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/kubernetes/configmap.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let cm: ConfigMap = serde_saphyr::from_str(&text).unwrap();
    let config = Config::parse(&cm.data["whydenied.yaml"], "configmap.yaml#whydenied.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.policies().is_empty());
}

#[test]
fn a_config_of_too_many_regexes_is_refused_at_the_first_one_over() {
    let policy = |i: usize| {
        format!(
            "  - {{ id: p{i}, match: {{ body: {{ regex: \"(a|b)*c{i}\" }} }}, cause: permission }}\n"
        )
    };
    let fits: String = (0..200).map(policy).collect();
    Config::from_yaml_str(&format!("policies:\n{fits}")).unwrap();
    let over: String = (0..201).map(policy).collect();
    // Line 202: the 201st policy (line 1 is `policies:`).
    assert_err(
        &format!("policies:\n{over}"),
        202,
        32,
        "more than 200 regexes",
    );
}

#[test]
fn sink_names_rule_ids_and_webhook_secrets_are_checked() {
    // A NUL in a sink name passed `check`, then panicked every denial's
    // sink start (thread names may not hold NUL).
    let e = err("sinks:\n  \"con\\0sole\": { stderr: {}, queue: 10 }\n");
    assert!(e.to_string().contains("sink name"), "{e}");
    let e = err(
        "sinks:\n  c: { stderr: {} }\nescalation:\n  rules:\n    - { id: \"a b\", same: [policy], count: 2, within: 1m, notify: [c] }\n",
    );
    assert!(e.to_string().contains("rule id"), "{e}");
    let e = err("sinks:\n  h: { webhook: { url: \"http://127.0.0.1:9/x\", secret: \"\" } }\n");
    assert!(e.to_string().contains("secret is empty"), "{e}");
}
