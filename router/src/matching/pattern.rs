//! Glob patterns of criteria: `*` and `?`, matched without backtracking.

use std::fmt;

/// A compiled glob pattern: `*` matches any run of characters (including none), `?`
/// exactly one character, every other character itself.
///
/// Matching never backtracks: the pattern is cut at its `*`s into segments; the first
/// segment must match at the start, the last at the end (it has a fixed number of
/// characters, so its place is known), and each middle segment is searched once, left to
/// right, at its leftmost occurrence after the previous one (which is always a correct
/// choice for globs). The cost is at most O(len(s) × len(pattern)), linear for literal
/// segments, never exponential (`a*a*a*a*b` included).
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    source: Box<str>,
    /// Bytes of `source` before the first wildcard.
    prefix_len: usize,
    shape: Shape,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Shape {
    /// Only `*`s: matches every string.
    Any,
    /// No wildcard: equality with the source.
    Literal,
    /// Some wildcard. `tail` is `None` when there is no `*`: then `head` must cover the
    /// whole string.
    Glob {
        head: Segment,
        middle: Vec<Segment>,
        tail: Option<Segment>,
    },
}

/// A run of the pattern between two `*`s: literals and `?`s, a fixed number of chars.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Segment {
    toks: Vec<Tok>,
    chars: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Lit(Box<str>),
    /// `n` consecutive `?`.
    AnyChars(usize),
}

impl Pattern {
    /// Compiles a pattern.
    pub fn new(p: &str) -> Self {
        let prefix_len = p.find(['*', '?']).unwrap_or(p.len());
        let shape = if !p.is_empty() && p.bytes().all(|b| b == b'*') {
            Shape::Any
        } else if prefix_len == p.len() {
            Shape::Literal
        } else {
            let mut parts = p.split('*');
            let head = Segment::parse(parts.next().unwrap_or(""));
            let rest: Vec<&str> = parts.collect();
            match rest.split_last() {
                None => Shape::Glob {
                    head,
                    middle: Vec::new(),
                    tail: None,
                },
                Some((last, middle)) => Shape::Glob {
                    head,
                    // `**` leaves an empty segment, which constrains nothing.
                    middle: middle
                        .iter()
                        .filter(|s| !s.is_empty())
                        .map(|s| Segment::parse(s))
                        .collect(),
                    tail: Some(Segment::parse(last)),
                },
            }
        };
        Self {
            source: p.into(),
            prefix_len,
            shape,
        }
    }

    /// Whether `s` matches the whole pattern.
    pub fn matches(&self, s: &str) -> bool {
        match &self.shape {
            Shape::Any => true,
            Shape::Literal => s == &*self.source,
            Shape::Glob { head, middle, tail } => {
                let Some(mut pos) = head.match_at(s, 0) else {
                    return false;
                };
                let Some(tail) = tail else {
                    return pos == s.len();
                };
                let tail_start = match tail.chars {
                    0 => s.len(),
                    k => match s.char_indices().nth_back(k - 1) {
                        Some((i, _)) => i,
                        None => return false,
                    },
                };
                if tail_start < pos || tail.match_at(s, tail_start).is_none() {
                    return false;
                }
                // Middle segments must fit between the head and the tail.
                let hay = &s[..tail_start];
                for seg in middle {
                    match seg.find(hay, pos) {
                        Some(end) => pos = end,
                        None => return false,
                    }
                }
                true
            }
        }
    }

    /// The characters before the first wildcard (the whole pattern if it has none).
    pub fn literal_prefix(&self) -> &str {
        &self.source[..self.prefix_len]
    }

    /// Whether the pattern has no wildcard (it matches only its own text).
    pub fn is_literal(&self) -> bool {
        matches!(self.shape, Shape::Literal)
    }

    /// Whether the pattern is its literal prefix, alone or followed by `*`s only: then a
    /// name with that prefix matches it.
    pub(super) fn is_prefix_only(&self) -> bool {
        self.source[self.prefix_len..].bytes().all(|b| b == b'*')
    }

    /// Whether the pattern matches every string (it is made of `*` only).
    pub fn matches_all(&self) -> bool {
        matches!(self.shape, Shape::Any)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pattern").field(&self.source).finish()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Segment {
    fn parse(s: &str) -> Self {
        let mut toks = Vec::new();
        let mut lit = String::new();
        for c in s.chars() {
            if c == '?' {
                if !lit.is_empty() {
                    toks.push(Tok::Lit(std::mem::take(&mut lit).into()));
                }
                match toks.last_mut() {
                    Some(Tok::AnyChars(n)) => *n += 1,
                    _ => toks.push(Tok::AnyChars(1)),
                }
            } else {
                lit.push(c);
            }
        }
        if !lit.is_empty() {
            toks.push(Tok::Lit(lit.into()));
        }
        Self {
            toks,
            chars: s.chars().count(),
        }
    }

    /// The end of the match if the segment matches `s` at byte `at` (a char boundary).
    fn match_at(&self, s: &str, mut at: usize) -> Option<usize> {
        for t in &self.toks {
            match t {
                Tok::Lit(l) => {
                    if !s[at..].starts_with(&**l) {
                        return None;
                    }
                    at += l.len();
                }
                Tok::AnyChars(n) => {
                    let mut chars = s[at..].chars();
                    for _ in 0..*n {
                        at += chars.next()?.len_utf8();
                    }
                }
            }
        }
        Some(at)
    }

    /// The end of the leftmost match starting at or after byte `from`. The segment is not
    /// empty (empty middle segments are dropped at compile time).
    fn find(&self, s: &str, from: usize) -> Option<usize> {
        match self.toks.first() {
            // Jump between occurrences of the leading literal (`str::find` is linear).
            Some(Tok::Lit(l)) => {
                let mut start = from;
                loop {
                    let i = start + s[start..].find(&**l)?;
                    if let Some(end) = self.match_at(s, i) {
                        return Some(end);
                    }
                    start = i + s[i..].chars().next().map_or(1, char::len_utf8);
                }
            }
            _ => s[from..]
                .char_indices()
                .find_map(|(i, _)| self.match_at(s, from + i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_semantics() {
        for (p, s, want) in [
            ("boiler-1", "boiler-1", true),
            ("boiler-1", "boiler-12", false),
            ("boiler-1", "boiler-", false),
            ("*", "", true),
            ("*", "anything", true),
            ("**", "x", true),
            ("", "", true),
            ("", "x", false),
            ("?", "", false),
            ("?", "a", true),
            ("?", "ab", false),
            ("?", "é", true),
            ("d??", "déf", true),
            ("d??", "dé", false),
            ("boiler-*", "boiler-", true),
            ("boiler-*", "boiler-7", true),
            ("boiler-*", "boile", false),
            ("*-temp", "a-temp", true),
            ("*-temp", "-temp", true),
            ("*-temp", "a-tem", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("a*b*c", "acb", false),
            ("a*b*b", "abb", true),
            ("a*b*b", "ab", false),
            ("*a*", "bab", true),
            ("*a*", "bbb", false),
            ("a*?", "a", false),
            ("a*?", "ab", true),
            ("*?*?*", "x", false),
            ("*?*?*", "xy", true),
            ("s-?-*-t?", "s-1-abc-t9", true),
            ("s-?-*-t?", "s-12-abc-t9", false),
            ("a*ab", "aab", true),
            ("*ab*ab", "abab", true),
            ("*ab*ab", "aba", false),
            ("x*y?z*", "xxyyzz", true),
            ("ab*ba", "aba", false),
            ("*.*", "a.b", true),
        ] {
            assert_eq!(Pattern::new(p).matches(s), want, "{p:?} vs {s:?}");
        }
    }

    /// Textbook dynamic-programming glob matcher, the reference for the fast one.
    fn reference(p: &[char], s: &[char]) -> bool {
        let mut m = vec![vec![false; s.len() + 1]; p.len() + 1];
        m[0][0] = true;
        for i in 1..=p.len() {
            for j in 0..=s.len() {
                m[i][j] = match p[i - 1] {
                    '*' => m[i - 1][j] || (j > 0 && m[i][j - 1]),
                    '?' => j > 0 && m[i - 1][j - 1],
                    c => j > 0 && s[j - 1] == c && m[i - 1][j - 1],
                };
            }
        }
        m[p.len()][s.len()]
    }

    /// Every word of up to `n` characters over `alphabet`.
    fn words(alphabet: &[char], n: usize) -> Vec<Vec<char>> {
        let mut all = vec![Vec::new()];
        let mut last = vec![Vec::new()];
        for _ in 0..n {
            last = last
                .iter()
                .flat_map(|w| {
                    alphabet.iter().map(move |c| {
                        let mut w = w.clone();
                        w.push(*c);
                        w
                    })
                })
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn glob_agrees_with_the_reference_exhaustively() {
        let subjects = words(&['a', 'b', 'é'], 5);
        for p in words(&['a', 'é', '*', '?'], 5) {
            let pattern = Pattern::new(&p.iter().collect::<String>());
            for s in &subjects {
                assert_eq!(
                    pattern.matches(&s.iter().collect::<String>()),
                    reference(&p, s),
                    "{pattern:?} vs {s:?}"
                );
            }
        }
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        let s = "a".repeat(20_000);
        let p = Pattern::new(&format!("{}b", "a*".repeat(60)));
        assert!(!p.matches(&s));
        let p = Pattern::new(&format!("*{}*", "?a*".repeat(60)));
        assert!(p.matches(&s));
        let p = Pattern::new(&format!("{}?b", "*a?".repeat(40)));
        assert!(!p.matches(&s));
    }

    #[test]
    fn pattern_properties() {
        let p = Pattern::new("site-12-*");
        assert_eq!((p.literal_prefix(), p.is_literal()), ("site-12-", false));
        let p = Pattern::new("dev-?1");
        assert_eq!((p.literal_prefix(), p.is_literal()), ("dev-", false));
        let p = Pattern::new("dev-1");
        assert_eq!((p.literal_prefix(), p.is_literal()), ("dev-1", true));
        let p = Pattern::new("*");
        assert!(p.matches_all() && p.literal_prefix().is_empty());
        assert_eq!(p.to_string(), "*");
    }
}
