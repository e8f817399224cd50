//! # whydenied
//!
//! A 403 says nothing. whydenied sits in front of a service and, when the
//! answer is a denial, says which policy denied the request, the likely causes
//! with their evidence, what the caller can do and whom to ask, and gives the
//! denial an id to quote. It never decides access: a 403 stays a 403, and a
//! response that is not a denial passes through untouched and streamed.
//!
//! This crate is both the engine and its two faces:
//!
//! - [`ExplainLayer`], a Tower layer for any Tower stack such as an axum
//!   `Router` (`default-features = false` gives just this);
//! - the `whydenied` binary (default feature `sidecar`): a reverse proxy that
//!   wraps the same layer around an upstream.
//!
//! The architecture, one module per concept:
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | the YAML config: parse → validate → compile, errors with locations |
//! | [`policy`], `literals` | compiled policies and signatures, first-match matching; the one-pass literal scan of bodies |
//! | [`facts`] | what is captured of a request before it is handed on |
//! | [`diagnose`], [`detect`] | policies, signatures and detectors → [`Explanation`] |
//! | [`explanation`] | the vocabulary: causes, likelihoods, remediation, exposure |
//! | [`negotiate`], [`render`] | choosing and writing problem+json, HTML or text |
//! | [`layer`], [`body`] | the Tower layer, its response future and body |
//! | [`events`] | denial and escalation events, redaction, recent store, sinks |
//! | [`escalation`], [`selfservice`] | escalation rules; "request access" |
//! | [`corpus`] | evaluating the diagnosis on labelled denials |
//! | `sidecar` (feature) | the reverse proxy, admin listener, reload, demo |
//!
//! See the [`layer`] module for a runnable example.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod body;
mod causes;
pub mod config;
pub mod corpus;
pub mod detect;
pub mod diagnose;
pub mod escalation;
pub mod escape;
pub mod events;
pub mod explanation;
pub mod facts;
pub mod id;
pub mod layer;
mod literals;
pub mod negotiate;
pub mod policy;
pub mod render;
pub mod selfservice;
#[cfg(feature = "sidecar")]
pub mod sidecar;
pub mod template;
#[cfg(feature = "tls")]
pub mod tls;
pub mod token;

pub use body::ExplainBody;
pub use config::{Config, ConfigError, ConfigHandle};
pub use explanation::{Audience, Cause, CauseKind, Effort, Explanation, Expose, Likelihood};
pub use facts::ClientAddr;
pub use id::DenialId;
pub use layer::{DENIAL_ID_HEADER, Explain, ExplainLayer, ResponseFuture};
pub use negotiate::Negotiated;
