//! POSTs each event as JSON, signed with HMAC-SHA256 when a key is set
//! (`x-whydenied-signature: sha256=HEX` over the exact body), with a timeout
//! per attempt and retries with exponential backoff and jitter on connection
//! errors, timeouts, 429 and 5xx. The receiver's answer body is never read.

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Request, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

use super::{Retired, Throttle, dropped, failed};
use crate::config::events::WebhookSpec;

#[cfg(feature = "tls")]
type Connector = crate::tls::Connector;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

fn make_connector(http: HttpConnector, target: &WebhookSpec) -> Result<Connector, String> {
    #[cfg(feature = "tls")]
    {
        crate::tls::connector(http, target.ca_file.as_deref())
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = target;
        Ok(http)
    }
}

/// The signature header value for `body`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| {
        <Hmac<Sha256> as Mac>::new_from_slice(b"").expect("an empty HMAC key is valid")
    });
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256=");
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << attempt.min(6));
    let capped = base.min(Duration::from_secs(5));
    let mut r = [0u8; 2];
    let jitter = if getrandom::fill(&mut r).is_ok() {
        u64::from(u16::from_le_bytes(r)) % (capped.as_millis() as u64 / 2 + 1)
    } else {
        0
    };
    capped + Duration::from_millis(jitter)
}

pub(super) fn run(
    name: &str,
    target: WebhookSpec,
    rx: Receiver<Arc<str>>,
    throttle: &Throttle,
    retired: &Retired,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            failed(name, throttle, &format!("cannot start: {e}"));
            for _ in rx {
                dropped(name, throttle, "sink not running");
            }
            return;
        }
    };
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(target.timeout));
    let connector = match make_connector(http, &target) {
        Ok(c) => c,
        Err(e) => {
            failed(name, throttle, &e);
            for _ in rx {
                dropped(name, throttle, "sink not running");
            }
            return;
        }
    };
    let client: Client<Connector, Full<Bytes>> = runtime.block_on(async {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector)
    });
    for line in rx {
        // No longer used: what is left is delivered once each, and only for
        // a while.
        if retired.drained_long_enough() {
            dropped(name, throttle, "sink replaced or stopped");
            continue;
        }
        let retries = if retired.is_retired() {
            0
        } else {
            target.retries
        };
        let body = Bytes::copy_from_slice(line.as_bytes());
        let kind = if line.contains("\"event\":\"escalation\"") {
            "escalation"
        } else {
            "denial"
        };
        let delivered = runtime.block_on(async {
            for attempt in 0..=retries {
                if attempt > 0 {
                    metrics::counter!("whydenied_webhook_retries_total", "sink" => name.to_owned())
                        .increment(1);
                    tokio::time::sleep(backoff(attempt - 1)).await;
                }
                let mut req = Request::post(target.url.clone())
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(
                        header::USER_AGENT,
                        concat!("whydenied/", env!("CARGO_PKG_VERSION")),
                    )
                    .header("x-whydenied-event", kind);
                if let Some(secret) = &target.secret {
                    req = req.header("x-whydenied-signature", signature(secret, &body));
                }
                let Ok(mut req) = req.body(Full::new(body.clone())) else {
                    return false;
                };
                for (k, v) in &target.headers {
                    req.headers_mut().insert(k.clone(), v.clone());
                }
                match tokio::time::timeout(target.timeout, client.request(req)).await {
                    Ok(Ok(res)) if res.status().is_success() => return true,
                    Ok(Ok(res)) => {
                        let status = res.status();
                        failed(name, throttle, &format!("the receiver answered {status}"));
                        if !(status.is_server_error()
                            || status.as_u16() == 429
                            || status.as_u16() == 408)
                        {
                            return false;
                        }
                    }
                    Ok(Err(e)) => failed(name, throttle, &format!("cannot deliver: {e}")),
                    Err(_) => failed(name, throttle, "the receiver did not answer in time"),
                }
            }
            false
        });
        if !delivered {
            dropped(name, throttle, "delivery failed after retries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
