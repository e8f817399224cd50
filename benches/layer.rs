//! The cost of the layer (criterion): a pass-through response through the
//! layer against the bare service, and an explained denial per format with
//! 50 policies loaded. Also counts heap allocations on the pass-through path.
//!
//! Run: `cargo bench --bench layer`. The figures are reported in the README;
//! nothing here passes or fails on a timing.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::{Layer, Service, service_fn};
use whydenied::{Config, ExplainLayer};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Every future here is ready at once (in-memory services): poll it once.
fn now<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("in-memory services are always ready"),
    }
}

fn fifty_policies() -> Config {
    let mut yaml = String::from(
        "intercept: [401, 403, 429]\nidentity: { header: x-forwarded-user, jwt_claim: sub }\nnetworks: { office: [192.0.2.0/24] }\npolicies:\n",
    );
    for i in 0..49 {
        let matcher = match i % 4 {
            0 => format!("{{ path: \"/svc{i}/**\" }}"),
            1 => format!("{{ path: \"/team{i}/*/items\", methods: [POST] }}"),
            2 => format!("{{ headers: {{ x-tenant{}: {{ equals: t{i} }} }} }}", i % 6),
            _ => format!("{{ body: {{ contains: \"code-{i}\" }} }}"),
        };
        yaml.push_str(&format!(
            "  - id: p{i}\n    match: {matcher}\n    cause: permission\n    detail: \"{{{{ method }}}} {{{{ path }}}} needs group g{i}\"\n"
        ));
    }
    yaml.push_str(
        "  - id: admin-console\n    title: Administrators only\n    match: { path: \"/admin/**\", methods: [GET] }\n    cause: permission\n    detail: \"{{ method }} {{ path }} is limited to ops-admins, {{ identity }}.\"\n    remediation:\n      - { step: Ask your team lead., for: caller }\n      - { step: Add the user to the group., for: admin, effort: medium }\n    owner: platform\n    contact: \"#help\"\n    docs: https://wiki.example.com/admin\n",
    );
    Config::from_yaml_str(&yaml).expect("bench config")
}

fn ok_service()
-> impl Service<Request<Empty<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    service_fn(|_req: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            b"hello, world",
        ))))
    })
}

fn denying_service()
-> impl Service<Request<Empty<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    service_fn(|_req: Request<Empty<Bytes>>| async {
        let mut res = Response::new(Full::new(Bytes::from_static(b"Forbidden")));
        *res.status_mut() = StatusCode::FORBIDDEN;
        Ok::<_, Infallible>(res)
    })
}

/// A request built the way hyper parses one: the URI and every header value
/// are slices of one shared read buffer, so cloning them is a reference-count
/// increment (a request built from `&str`s would allocate on the first clone
/// of each value, which no server-parsed request does).
fn request(accept: &str) -> Request<Empty<Bytes>> {
    let fields = [
        ("host", "app.example.com"),
        ("accept", accept),
        ("user-agent", "bench/1.0"),
        ("x-forwarded-user", "bob"),
        ("cookie", "session=abc"),
    ];
    let path = "/admin/users?page=2";
    let mut raw = Vec::with_capacity(256);
    raw.extend_from_slice(path.as_bytes());
    let mut spans = Vec::new();
    for (_, value) in &fields {
        let start = raw.len();
        raw.extend_from_slice(value.as_bytes());
        spans.push(start..raw.len());
    }
    let buffer = Bytes::from(raw);
    let _promote_to_shared = buffer.clone();
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = http::Uri::from_maybe_shared(buffer.slice(..path.len())).unwrap();
    for ((name, _), span) in fields.iter().zip(spans) {
        let value = http::HeaderValue::from_maybe_shared(buffer.slice(span)).unwrap();
        req.headers_mut().insert(*name, value);
    }
    req
}

fn pass_through(c: &mut Criterion) {
    let mut group = c.benchmark_group("pass_through");
    let mut bare = ok_service();
    let mut layered = ExplainLayer::new(fifty_policies()).layer(ok_service());
    group.bench_function("bare_service", |b| {
        b.iter_batched(
            || request("*/*"),
            |req| black_box(now(bare.call(req)).unwrap()),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("through_layer", |b| {
        b.iter_batched(
            || request("*/*"),
            |req| black_box(now(layered.call(req)).unwrap()),
            BatchSize::SmallInput,
        )
    });
    group.finish();

    // Heap allocations per pass-through request, layer minus bare service.
    let count = |svc: &mut dyn FnMut(Request<Empty<Bytes>>)| {
        let requests: Vec<_> = (0..1000).map(|_| request("*/*")).collect();
        let region = Region::new(GLOBAL);
        for req in requests {
            svc(req);
        }
        region.change().allocations
    };
    let bare_allocs = count(&mut |req| drop(now(bare.call(req))));
    let layer_allocs = count(&mut |req| drop(now(layered.call(req))));
    println!(
        "pass_through/allocations per request: bare service {:.2}, through layer {:.2}",
        bare_allocs as f64 / 1000.0,
        layer_allocs as f64 / 1000.0
    );
}

fn denial(c: &mut Criterion) {
    let mut group = c.benchmark_group("explained_denial_50_policies");
    let mut layered = ExplainLayer::new(fifty_policies()).layer(denying_service());
    for (name, accept) in [
        ("problem_json", "application/json"),
        ("html", "text/html"),
        ("text", "text/plain"),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || request(accept),
                |req| {
                    let res = now(layered.call(req)).unwrap();
                    assert!(res.headers().contains_key("x-denial-id"));
                    black_box(res)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn diagnosis(c: &mut Criterion) {
    // A 64 KiB HTML error page that most signatures must scan and reject,
    // with a Kubernetes Status document at its end.
    let mut body = String::from("<html><head><title>Error</title></head><body>");
    while body.len() < 64 * 1024 - 400 {
        body.push_str(
            "<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.</p>\n",
        );
    }
    body.push_str(r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"pods is forbidden: User \"jane\" cannot list resource \"pods\" in API group \"\"","reason":"Forbidden","code":403}"#);
    let config = Config::default();
    let headers = http::HeaderMap::new();
    let e = whydenied::corpus::explain_response(
        &config,
        StatusCode::FORBIDDEN,
        None,
        &headers,
        body.as_bytes(),
    );
    assert_eq!(e.top_cause(), whydenied::CauseKind::Permission);
    // The hard case for a literal prefilter: a help page that talks about
    // denials, so that many signatures' literals occur and their regexes
    // must run, and none of them matches.
    let paragraph = "<p>Your request was forbidden. A request is refused when \
        the token expired, when a rate limit was exceeded (too many requests \
        in a minute), when the credentials were not provided, when the \
        permission is missing or access is denied by an explicit rule, when \
        the caller does not have the role, or when a firewall blocked the \
        request. Check the error code, the reference id and the documentation \
        before you ask the administrators for access.</p>\n";
    let mut prose = String::from("<html><body>");
    while prose.len() + paragraph.len() < 64 * 1024 {
        prose.push_str(paragraph);
    }
    for (name, body) in [
        ("diagnose_64k_body_whole_signature_pack", &body),
        ("diagnose_64k_prose_about_denials", &prose),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                black_box(whydenied::corpus::explain_response(
                    &config,
                    StatusCode::FORBIDDEN,
                    None,
                    &headers,
                    black_box(body.as_bytes()),
                ))
            })
        });
    }
}

fn events(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("whydenied-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let with_events = format!(
        "{}events: {{ sinks: [audit] }}\nsinks:\n  audit: {{ file: {{ path: \"{}\", max_bytes: 1048576, keep: 1 }}, queue: 100000 }}\nescalation:\n  rules:\n{}",
        "identity: { header: x-forwarded-user }\npolicies:\n  - { id: admin, match: { path: \"/admin/**\" }, cause: permission }\n",
        dir.join("events.jsonl").display(),
        (0..5)
            .map(|i| format!("    - {{ id: r{i}, same: [identity, policy], count: {}, within: 10m, notify: [audit] }}\n", 1000 + i))
            .collect::<String>()
    );
    let plain = "identity: { header: x-forwarded-user }\npolicies:\n  - { id: admin, match: { path: \"/admin/**\" }, cause: permission }\n";
    let mut group = c.benchmark_group("explained_denial_events");
    for (name, yaml) in [
        ("no_sinks_no_rules", plain.to_owned()),
        ("file_sink_and_5_rules", with_events),
    ] {
        let mut layered =
            ExplainLayer::new(Config::from_yaml_str(&yaml).unwrap()).layer(denying_service());
        group.bench_function(name, |b| {
            b.iter_batched(
                || request("application/json"),
                |req| black_box(now(layered.call(req)).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    // A flood of denials from distinct (spoofed) identities stays within the
    // configured cap on tracked keys.
    let yaml = "identity: { header: x-forwarded-user }\nescalation:\n  max_tracked_keys: 10000\n  rules:\n    - { id: stuck, same: [identity], count: 5, within: 10m, notify: [] }\n";
    let layer = ExplainLayer::new(Config::from_yaml_str(yaml).unwrap());
    let recorder = layer.recorder().clone();
    let mut svc = layer.layer(denying_service());
    let start = std::time::Instant::now();
    for i in 0..100_000u32 {
        let mut req = request("application/json");
        req.headers_mut().insert(
            "x-forwarded-user",
            http::HeaderValue::from_str(&format!("spoofed-{i}")).unwrap(),
        );
        drop(now(svc.call(req)));
    }
    println!(
        "flood: 100000 denials from distinct identities in {:.2?}; recent store holds {} (cap 10000 by default)",
        start.elapsed(),
        recorder.store.len()
    );
}

criterion_group!(benches, pass_through, denial, diagnosis, events);
criterion_main!(benches);
