//! The diagnosis against the labelled corpus (a committed copy of
//! ../shared/corpus under tests/corpus), and against samples of the same
//! software written from its public documentation (tests/corpus_extra).

use std::path::Path;

use whydenied::Config;
use whydenied::corpus::evaluate;

/// Top cause right on at least 90% of the inferable samples in `dir` (of
/// which there are at least `min_samples`), the temporary flag on all.
fn assert_diagnosed(dir: &str, min_samples: usize) {
    let report = evaluate(
        &Config::default(),
        &Path::new(env!("CARGO_MANIFEST_DIR")).join(dir),
    )
    .unwrap();
    let table = report.to_markdown();
    println!("{table}");
    let (right, total) = report.cause_accuracy();
    assert!(total >= min_samples, "{total} inferable samples");
    assert!(
        right * 10 >= total * 9,
        "top cause right on only {right} of {total}:\n{table}"
    );
    let (tr, tt) = report.temporary_accuracy();
    assert_eq!(tr, tt, "temporary wrong:\n{table}");
}

#[test]
fn the_corpus_is_diagnosed_correctly() {
    assert_diagnosed("tests/corpus", 40);
}

#[test]
fn other_denials_of_the_same_software_are_recognised_too() {
    assert_diagnosed("tests/corpus_extra", 12);
}
