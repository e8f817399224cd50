//! Required literals of a body pattern, for the one-pass body scan.
//!
//! For each body condition we look for a small set of literals such that
//! every match of the pattern contains at least one of them (compared after
//! ASCII lowercasing). One Aho-Corasick pass over the body finds which of
//! these literals occur; only the conditions whose literals were found are
//! then checked with their own regex. A pattern without a usable literal is
//! always checked: the scan only ever skips work that could not match.

use regex_syntax::hir::{Class, Hir, HirKind};

/// Literals, one of which every match contains.
pub(crate) type Literals = Vec<Vec<u8>>;

/// Literals shorter than this make a poor filter: the pattern is run instead.
const MIN_LITERAL: usize = 3;
/// Literals are cut to this length (their rarest start kept).
const MAX_LITERAL: usize = 32;
/// More alternatives than this make a poor filter too.
const MAX_ALTERNATIVES: usize = 16;

/// Lowercase literals at least one of which occurs (ASCII-lowercased) in
/// every match of `pattern`, or `None` when there is no useful set.
pub(crate) fn required_literals(pattern: &str) -> Option<Literals> {
    required_set(pattern).map(|set| set.into_iter().map(rare_window).collect())
}

fn required_set(pattern: &str) -> Option<Literals> {
    let hir = regex_syntax::ParserBuilder::new()
        .utf8(false)
        .nest_limit(64)
        .build()
        .parse(pattern)
        .ok()?;
    let set = required(&hir)?;
    (min_len(&set) >= MIN_LITERAL).then_some(set)
}

/// How common a byte is in the HTML, JSON and English prose of error pages
/// (higher is more common): a rough guide for [`rare_window`].
fn commonness(b: u8) -> u32 {
    match b {
        b' ' | b'e' | b't' | b'a' | b'o' | b'<' | b'>' | b'"' => 10,
        b'i' | b'n' | b's' | b'r' | b'h' | b'l' | b'/' | b'=' | b'\n' => 8,
        b'd' | b'c' | b'u' | b'm' | b'p' | b':' | b',' | b'.' => 6,
        b'f' | b'g' | b'w' | b'y' | b'b' | b'-' | b'_' | b'0'..=b'9' => 4,
        b'v' | b'k' => 2,
        _ => 1,
    }
}

/// The part of `literal` that starts with its rarest three bytes.
///
/// Any part of a required literal is required too. The SIMD search
/// recognises candidates by their first three bytes, so a literal that starts
/// with `" ex"` or `"the"` stops it at every other word; one that starts with
/// `"_qu"` rarely.
fn rare_window(literal: Vec<u8>) -> Vec<u8> {
    // Keep enough of it that a hit still says something.
    const KEEP: usize = 8;
    if literal.len() <= KEEP {
        return literal;
    }
    let best = (0..=literal.len() - KEEP)
        .min_by_key(|&i| {
            literal[i..i + 3]
                .iter()
                .map(|&b| commonness(b))
                .sum::<u32>()
        })
        .unwrap_or(0);
    // Any part of it is required too: a bounded length bounds the cost of
    // confirming a candidate.
    let end = literal.len().min(best + MAX_LITERAL);
    literal[best..end].to_vec()
}

/// The literal for `contains: TEXT`.
pub(crate) fn contains_literal(text: &[u8]) -> Option<Literals> {
    (text.len() >= MIN_LITERAL).then(|| vec![rare_window(text.to_ascii_lowercase())])
}

const KELVIN: u32 = 0x212A;
const LONG_S: u32 = 0x17F;

/// The body as the literals are compared with it: ASCII lowercased, and the
/// Kelvin sign and long s (which `(?i)` matches as `k` and `s`) replaced by
/// those letters.
pub(crate) fn fold(body: &[u8]) -> Vec<u8> {
    let lower = body.to_ascii_lowercase();
    const KELVIN_UTF8: &[u8] = "\u{212A}".as_bytes();
    const LONG_S_UTF8: &[u8] = "\u{17F}".as_bytes();
    if memchr::memchr2(KELVIN_UTF8[0], LONG_S_UTF8[0], &lower).is_none() {
        return lower;
    }
    let mut out = Vec::with_capacity(lower.len());
    let mut rest = &lower[..];
    while let Some(i) = memchr::memchr2(KELVIN_UTF8[0], LONG_S_UTF8[0], rest) {
        out.extend_from_slice(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with(KELVIN_UTF8) {
            out.push(b'k');
            rest = &tail[KELVIN_UTF8.len()..];
        } else if tail.starts_with(LONG_S_UTF8) {
            out.push(b's');
            rest = &tail[LONG_S_UTF8.len()..];
        } else {
            out.push(tail[0]);
            rest = &tail[1..];
        }
    }
    out.extend_from_slice(rest);
    out
}

fn min_len(set: &[Vec<u8>]) -> usize {
    set.iter().map(Vec::len).min().unwrap_or(0)
}

/// Which of two candidate sets filters better: longer shortest literal, then
/// fewer alternatives.
fn better(a: &[Vec<u8>], b: &[Vec<u8>]) -> bool {
    (min_len(a), std::cmp::Reverse(a.len())) > (min_len(b), std::cmp::Reverse(b.len()))
}

/// The single byte a class stands for once ASCII-lowercased (`[Kk]` → `k`).
fn folded_byte(class: &Class) -> Option<u8> {
    let mut only: Option<u8> = None;
    let mut take = |c: u32| -> bool {
        // The two non-ASCII characters that Unicode case-folds to ASCII
        // letters; `fold` turns them into those letters in the body copy.
        let c = match c {
            KELVIN => u32::from(b'k'),
            LONG_S => u32::from(b's'),
            c => c,
        };
        let Ok(b) = u8::try_from(c) else {
            return false;
        };
        if !b.is_ascii() {
            return false;
        }
        let b = b.to_ascii_lowercase();
        match only {
            None => {
                only = Some(b);
                true
            }
            Some(o) => o == b,
        }
    };
    // Every range must be one or two characters (`K`, `Kk`), all folding
    // to the same byte.
    let mut range = |start: u32, end: u32| end - start <= 1 && (start..=end).all(&mut take);
    let single = match class {
        Class::Unicode(u) => u
            .ranges()
            .iter()
            .all(|r| range(r.start().into(), r.end().into())),
        Class::Bytes(b) => b
            .ranges()
            .iter()
            .all(|r| range(r.start().into(), r.end().into())),
    };
    if !single {
        return None;
    }
    only
}

fn required(hir: &Hir) -> Option<Literals> {
    match hir.kind() {
        HirKind::Literal(lit) => Some(vec![lit.0.to_ascii_lowercase()]),
        HirKind::Class(class) => folded_byte(class).map(|b| vec![vec![b]]),
        HirKind::Capture(cap) => required(&cap.sub),
        HirKind::Repetition(rep) if rep.min >= 1 => required(&rep.sub),
        HirKind::Alternation(subs) => {
            let mut all = Vec::new();
            for sub in subs {
                all.extend(required(sub)?);
                if all.len() > MAX_ALTERNATIVES {
                    return None;
                }
            }
            all.sort();
            all.dedup();
            Some(all)
        }
        HirKind::Concat(subs) => {
            let mut best: Option<Literals> = None;
            let mut consider = |candidate: Literals| {
                if best.as_ref().is_none_or(|b| better(&candidate, b)) {
                    best = Some(candidate);
                }
            };
            // Runs of single bytes (literals, case-folded letters) form one
            // longer literal; anything else ends the run and is a candidate
            // of its own.
            let mut run: Vec<u8> = Vec::new();
            for sub in subs {
                let piece = match sub.kind() {
                    HirKind::Literal(lit) => Some(lit.0.to_ascii_lowercase()),
                    HirKind::Class(class) => folded_byte(class).map(|b| vec![b]),
                    _ => None,
                };
                match piece {
                    Some(bytes) => run.extend_from_slice(&bytes),
                    None => {
                        if !run.is_empty() {
                            consider(vec![std::mem::take(&mut run)]);
                        }
                        if let Some(set) = required(sub) {
                            consider(set);
                        }
                    }
                }
            }
            if !run.is_empty() {
                consider(vec![run]);
            }
            best
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lits(pattern: &str) -> Option<Vec<String>> {
        required_set(pattern).map(|set| {
            set.into_iter()
                .map(|l| String::from_utf8(l).unwrap())
                .collect()
        })
    }

    #[test]
    fn picks_the_longest_required_piece() {
        assert_eq!(
            lits(r#""reason"\s*:\s*"CREDENTIALS_MISSING""#),
            Some(vec![r#""credentials_missing""#.to_owned()])
        );
        assert_eq!(
            lits("<Code>AccessDenied</Code>"),
            Some(vec!["<code>accessdenied</code>".to_owned()])
        );
    }

    #[test]
    fn case_insensitive_letters_fold() {
        assert_eq!(
            lits("(?i)Request blocked"),
            Some(vec!["request blocked".into()])
        );
        // `(?i)k` also matches the Kelvin sign and `(?i)s` the long s: the
        // body copy folds them, so the literal is still found.
        let re = regex::bytes::Regex::new("(?i)csrf token").unwrap();
        let body = "<p>C\u{17F}RF to\u{212A}en missing</p>".as_bytes();
        assert!(re.is_match(body));
        let set = required_literals("(?i)csrf token").unwrap();
        let folded = fold(body);
        assert!(
            set.iter()
                .any(|l| memchr::memmem::find(&folded, l).is_some()),
            "{set:?} in {:?}",
            String::from_utf8_lossy(&folded)
        );
    }

    #[test]
    fn windows_start_at_rare_bytes() {
        let w = |s: &str| String::from_utf8(rare_window(s.as_bytes().to_vec())).unwrap();
        assert_eq!(w("\"credentials_missing\""), "s_missing\"");
        assert_eq!(w("no api key found"), "key found");
        assert_eq!(w("short"), "short");
    }

    #[test]
    fn alternations_need_every_branch() {
        assert_eq!(
            lits("(?i)Error 1015|You are being rate limited"),
            Some(vec![
                "error 1015".into(),
                "you are being rate limited".into()
            ])
        );
        // One branch has nothing required: no filter.
        assert_eq!(lits("abcdef|.*"), None);
        assert_eq!(lits(r"\d+|abcdef"), None);
    }

    #[test]
    fn optional_parts_are_not_required() {
        assert_eq!(lits("(abcdef)?xy"), None);
        assert_eq!(lits("x(abcdef)+y"), Some(vec!["abcdef".into()]));
        assert_eq!(lits("^a.b"), None);
    }

    /// Random patterns, and texts built to match them: whenever the regex
    /// matches, one of its literals is in the folded text (the scan may only
    /// skip patterns that cannot match).
    #[test]
    fn random_patterns_never_lose_a_match() {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        // (pattern piece, texts it matches)
        let atoms: &[(&str, &[&str])] = &[
            ("abc", &["abc"]),
            ("Error", &["Error"]),
            ("sky", &["sky"]),
            ("Kiosk", &["Kiosk"]),
            ("x-y", &["x-y"]),
            ("\"code\"", &["\"code\""]),
            ("[Kk]ey", &["Key", "key"]),
            (r"\d+", &["7", "123"]),
            (".", &["z", "é"]),
            (r"\s*", &["", " ", "\n"]),
            ("(?i:ok)", &["OK", "ok", "oK"]),
            ("é", &["é"]),
            ("Token", &["Token"]),
            ("deny", &["deny"]),
            ("ACCESS", &["ACCESS"]),
            (r"\bword\b", &["word"]),
        ];
        let mut checked = 0;
        for _ in 0..3000 {
            let insensitive = next(2) == 0;
            let mut pattern = String::from(if insensitive { "(?i)" } else { "" });
            let mut text = String::new();
            for _ in 0..1 + next(4) {
                let (a, a_texts) = atoms[next(atoms.len())];
                let (b, b_texts) = atoms[next(atoms.len())];
                let sample = match next(4) {
                    0 => {
                        pattern.push_str(&format!("(?:{a})?"));
                        if next(2) == 0 {
                            ""
                        } else {
                            a_texts[next(a_texts.len())]
                        }
                    }
                    1 => {
                        pattern.push_str(&format!("(?:{a}|{b})"));
                        if next(2) == 0 {
                            a_texts[next(a_texts.len())]
                        } else {
                            b_texts[next(b_texts.len())]
                        }
                    }
                    2 => {
                        pattern.push_str(&format!("(?:{a}){{1,2}}"));
                        a_texts[next(a_texts.len())]
                    }
                    _ => {
                        pattern.push_str(a);
                        a_texts[next(a_texts.len())]
                    }
                };
                for c in sample.chars() {
                    let c = if !insensitive {
                        c
                    } else {
                        match (c.to_ascii_lowercase(), next(4)) {
                            ('k', 0) => '\u{212A}',
                            ('s', 0) => '\u{17F}',
                            (_, 1) => c.to_ascii_uppercase(),
                            (_, 2) => c.to_ascii_lowercase(),
                            _ => c,
                        }
                    };
                    text.push(c);
                }
            }
            let Ok(re) = regex::bytes::Regex::new(&pattern) else {
                continue;
            };
            let body = format!(
                "<p>{}{text}{}</p>",
                "n".repeat(next(5)),
                "m".repeat(next(5))
            );
            if !re.is_match(body.as_bytes()) {
                continue;
            }
            let Some(set) = required_literals(&pattern) else {
                continue;
            };
            let folded = fold(body.as_bytes());
            assert!(
                set.iter()
                    .any(|l| memchr::memmem::find(&folded, l).is_some()),
                "{pattern:?} matches {body:?} but none of {set:?} is in it"
            );
            checked += 1;
        }
        assert!(checked > 1000, "only {checked} cases checked");
    }

    #[test]
    fn every_shipped_signature_matches_its_own_literals() {
        // A sanity check of soundness on real patterns: whenever the regex
        // matches a text, one of its literals occurs in the lowercased text.
        let samples = [
            (
                "(?i)Error 1015|You are being rate limited",
                "ERROR 1015 here",
            ),
            (r#"\"code\"\s*:\s*\"DENIED\""#, r#"{"code" : "DENIED"}"#),
            (
                r"is not authorized to perform: [A-Za-z0-9-]+:[A-Za-z0-9*]+",
                "User x is not authorized to perform: s3:GetObject",
            ),
        ];
        for (pattern, text) in samples {
            assert!(regex::Regex::new(pattern).unwrap().is_match(text));
            let lower = text.to_ascii_lowercase();
            let set = required_literals(pattern).unwrap();
            assert!(
                set.iter()
                    .any(|l| memchr::memmem::find(lower.as_bytes(), l).is_some()),
                "{pattern}"
            );
        }
    }
}
