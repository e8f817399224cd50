//! The small template language of `title`, `detail` and remediation steps.
//!
//! `{{ name }}` inserts one of a fixed set of safe variables ([`Var`]);
//! everything else is literal text. Templates are parsed once when the config
//! is compiled, so a typo in a variable name is a config error with a
//! location, never a surprise at request time. Values are cleaned
//! ([`crate::escape::clean`]) before they are inserted, and each output format
//! escapes the result, so a template cannot be used to inject markup.

use std::fmt::Write as _;

/// A variable a template may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Var {
    /// The request method.
    Method,
    /// The request path, without the query (which may hold secrets).
    Path,
    /// The requested host.
    Host,
    /// The response status code.
    Status,
    /// The matched policy's id.
    Policy,
    /// The matched policy's title.
    PolicyTitle,
    /// The caller's identity, or "anonymous".
    Identity,
    /// The caller's address as whydenied sees it.
    ClientIp,
    /// The denial id.
    DenialId,
    /// The matched policy's owner.
    Owner,
    /// The matched policy's contact.
    Contact,
}

const VARS: &[(&str, Var)] = &[
    ("method", Var::Method),
    ("path", Var::Path),
    ("host", Var::Host),
    ("status", Var::Status),
    ("policy", Var::Policy),
    ("policy_title", Var::PolicyTitle),
    ("identity", Var::Identity),
    ("client_ip", Var::ClientIp),
    ("denial_id", Var::DenialId),
    ("owner", Var::Owner),
    ("contact", Var::Contact),
];

/// Names of all variables, for error messages and docs.
pub fn var_names() -> Vec<&'static str> {
    VARS.iter().map(|(n, _)| *n).collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(Var),
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    source: String,
}

/// Values for the variables of one denial, already cleaned.
pub trait Vars {
    /// The value of `var`, written to `out`.
    fn write(&self, var: Var, out: &mut String);
}

impl Template {
    /// Parses `text`; the error says what is wrong, for the config error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or_else(|| {
                "a `{{` is not closed by `}}`; write a variable as {{ path }}".to_owned()
            })?;
            let name = after[..close].trim();
            let var = VARS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    let mut msg = format!("unknown template variable `{name}`");
                    if let Some(s) = crate::config::suggest(name, &var_names()) {
                        let _ = write!(msg, " (did you mean `{s}`?)");
                    }
                    let _ = write!(msg, "; the variables are {}", var_names().join(", "));
                    msg
                })?;
            parts.push(Part::Var(var));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Self {
            parts,
            source: text.to_owned(),
        })
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders with the given values.
    pub fn render(&self, vars: &dyn Vars) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Var(var) => vars.write(*var, &mut out),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Vars for Fixed {
        fn write(&self, var: Var, out: &mut String) {
            out.push_str(match var {
                Var::Method => "GET",
                Var::Path => "/admin",
                _ => "?",
            })
        }
    }

    #[test]
    fn renders_variables_and_literals() {
        let t = Template::parse("{{method}} {{ path }} is for admins").unwrap();
        assert_eq!(t.render(&Fixed), "GET /admin is for admins");
        assert_eq!(Template::parse("plain").unwrap().render(&Fixed), "plain");
    }

    #[test]
    fn rejects_unknown_variables_with_a_suggestion() {
        let err = Template::parse("{{ pth }}").unwrap_err();
        assert!(err.contains("unknown template variable `pth`"), "{err}");
        assert!(err.contains("did you mean `path`?"), "{err}");
    }

    #[test]
    fn rejects_unclosed_braces() {
        assert!(
            Template::parse("{{ path")
                .unwrap_err()
                .contains("not closed")
        );
    }
}
