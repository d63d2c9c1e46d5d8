//! Normalization, the per-document filters (length, Gopher-style
//! heuristics, decontamination), the dedup key, and [`Drop`]: every reason a
//! document is left out.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::{IsNormalized, is_nfc_quick};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use twinhead_proto::dataset::Filters;

/// NFC, then drop control characters except `\n` and `\t` (`\r\n` and `\r`
/// become `\n`).
pub fn normalize(text: &str) -> String {
    normalize_cow(Cow::Borrowed(text))
}

/// [`normalize`] of an owned text, which is returned as it is (no copy)
/// when already normalized, as most text is.
pub fn normalize_owned(text: String) -> String {
    normalize_cow(Cow::Owned(text))
}

fn normalize_cow(text: Cow<str>) -> String {
    let keep = |c: &char| !c.is_control() || *c == '\n' || *c == '\t';
    let text: Cow<str> = if text.contains('\r') {
        Cow::Owned(text.replace("\r\n", "\n").replace('\r', "\n"))
    } else {
        text
    };
    // Most text is already NFC: the quick check ("yes" means NFC leaves it
    // as it is) costs a fraction of composing, and ASCII needs neither.
    let ascii = text.is_ascii();
    if ascii || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        // On ASCII, the control characters are the bytes below 0x20 and 0x7f.
        let clean = if ascii {
            text.bytes()
                .all(|b| (b >= 0x20 && b != 0x7f) || b == b'\n' || b == b'\t')
        } else {
            text.chars().all(|c| keep(&c))
        };
        if clean {
            return text.into_owned();
        }
        return text.chars().filter(keep).collect();
    }
    text.nfc().filter(keep).collect()
}

/// Dedup key of a normalized document: 128-bit hash of its lowercased
/// words joined by single spaces (so whitespace and case do not matter).
pub fn dedup_key(text: &str) -> u128 {
    let mut canon = String::with_capacity(text.len());
    // ASCII without vertical tabs: the same words on ASCII whitespace, and
    // ASCII lowercasing is `to_lowercase` on them.
    if text.is_ascii() && !text.as_bytes().contains(&0x0b) {
        for (i, w) in text.split_ascii_whitespace().enumerate() {
            if i > 0 {
                canon.push(' ');
            }
            canon.push_str(w);
        }
        canon.make_ascii_lowercase();
        return xxh3_128(canon.as_bytes());
    }
    for (i, w) in text.split_whitespace().enumerate() {
        if i > 0 {
            canon.push(' ');
        }
        for c in w.chars() {
            if c.is_ascii() {
                canon.push(c.to_ascii_lowercase());
            } else {
                canon.extend(c.to_lowercase());
            }
        }
    }
    xxh3_128(canon.as_bytes())
}

/// A hasher of short keys (a document's lines): one `xxh3_64` call per
/// write. The streaming `Xxh3` state that `Xxh3Builder` gives costs more to
/// set up than a line costs to hash; the set still compares the lines
/// themselves, so this changes speed only.
#[derive(Default)]
struct OneShotXxh3(u64);

impl std::hash::Hasher for OneShotXxh3 {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = self.0.rotate_left(29) ^ xxh3_64(bytes);
    }
}

/// An n-gram key's count and first position.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: u64,
    /// Position of the first n-gram with this key.
    first: u32,
    /// Occurrences so far; 0 marks an empty slot.
    count: u32,
}

/// The n-gram statistics' table, one per thread and reused: open
/// addressing over already-hashed keys, one cache line per lookup (a
/// `HashMap` of these keys costs about twice as much per n-gram, and the
/// n-gram rules are most of a filtered build's time after tokenizing).
#[derive(Default)]
struct NgramTable {
    slots: Vec<Slot>,
    /// Slots in use: `slots[..mask + 1]`.
    mask: usize,
    shift: u32,
}

thread_local! {
    static TABLE: std::cell::RefCell<NgramTable> = std::cell::RefCell::new(NgramTable::default());
}

impl NgramTable {
    /// Empty, with room for `items` keys at most half full.
    fn reset(&mut self, items: usize) {
        let size = (items * 2).next_power_of_two().max(16);
        if self.slots.len() < size {
            self.slots = vec![Slot::default(); size];
        } else {
            self.slots[..size].fill(Slot::default());
        }
        self.mask = size - 1;
        self.shift = 64 - size.trailing_zeros();
    }

    /// The slot of `key`, claimed for position `i` when new (count 0).
    fn slot(&mut self, key: u64, i: usize) -> &mut Slot {
        let mut p = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize;
        loop {
            let s = self.slots[p];
            if s.count == 0 {
                self.slots[p] = Slot {
                    key,
                    first: i as u32,
                    count: 0,
                };
                return &mut self.slots[p];
            }
            if s.key == key {
                return &mut self.slots[p];
            }
            p = (p + 1) & self.mask;
        }
    }
}

/// The keys of a document's word n-grams, `n` by `n`: the key of words
/// `[i, i + n)` folds their hashes in order, so the keys for `n + 1` extend
/// those for `n` by one word instead of refolding `n` hashes.
struct NgramKeys<'a> {
    hashes: &'a [u64],
    /// Keys of every n-gram for `n` words (`hashes.len() - n + 1` of them).
    keys: Vec<u64>,
    n: usize,
}

impl<'a> NgramKeys<'a> {
    const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

    fn step(acc: u64, h: u64) -> u64 {
        (acc.rotate_left(5) ^ h).wrapping_mul(0x0100_0000_01B3)
    }

    fn new(hashes: &'a [u64]) -> Self {
        NgramKeys {
            hashes,
            keys: vec![Self::SEED; hashes.len() + 1],
            n: 0,
        }
    }

    /// Keys of the `n`-grams, in order (`n <= hashes.len()`).
    fn keys(&mut self, n: usize) -> &[u64] {
        if n < self.n {
            self.keys.clear();
            self.keys.resize(self.hashes.len() + 1, Self::SEED);
            self.n = 0;
        }
        while self.n < n {
            let m = self.n;
            self.keys.truncate(self.hashes.len() - m);
            for (i, k) in self.keys.iter_mut().enumerate() {
                *k = Self::step(*k, self.hashes[i + m]);
            }
            self.n += 1;
        }
        &self.keys
    }
}

/// Hashes of a text's word n-grams for decontamination: words are runs of
/// letters and digits, lowercased, so punctuation and case do not hide an
/// overlap. A text of fewer than `n` words has none.
pub fn word_ngrams(text: &str, n: usize) -> Vec<u64> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    if n == 0 || words.len() < n {
        return Vec::new();
    }
    words
        .windows(n)
        .map(|w| xxh3_64(w.join(" ").as_bytes()))
        .collect()
}

/// Why a document was dropped: by a quality filter, by decontamination, by
/// the source-wide dedup or by a source's caps. The string is the counter
/// name in reports and the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Drop {
    Empty,
    MinChars,
    MaxChars,
    MeanWordLength,
    SymbolRatio,
    DigitRatio,
    RepeatedLines,
    TopNgram,
    DuplicateNgram,
    /// Shares a word n-gram with the decontamination reference.
    Decontaminated,
    /// An exact duplicate of an earlier document of the source.
    Duplicate,
    /// Past the source's `max_docs` or `max_chars`.
    OverLimit,
}

impl Drop {
    /// Counter name.
    pub fn name(self) -> &'static str {
        match self {
            Drop::Empty => "empty",
            Drop::MinChars => "min_chars",
            Drop::MaxChars => "max_chars",
            Drop::MeanWordLength => "mean_word_length",
            Drop::SymbolRatio => "symbol_ratio",
            Drop::DigitRatio => "digit_ratio",
            Drop::RepeatedLines => "repeated_lines",
            Drop::TopNgram => "top_ngram",
            Drop::DuplicateNgram => "duplicate_ngram",
            Drop::Decontaminated => "decontaminated",
            Drop::Duplicate => "duplicate",
            Drop::OverLimit => "over_limit",
        }
    }

    /// Counts one drop in `counters` (keyed by [`Drop::name`]).
    pub fn count(self, counters: &mut BTreeMap<String, u64>) {
        *counters.entry(self.name().to_string()).or_insert(0) += 1;
    }
}

/// The word n-grams of a decontamination reference: a document sharing any
/// of them is dropped.
#[derive(Debug, Default)]
pub struct Reference {
    /// Words per n-gram.
    pub ngram: usize,
    /// Hashes of every reference n-gram ([`word_ngrams`]).
    pub grams: HashSet<u64>,
}

impl Reference {
    /// Whether normalized `text` shares an n-gram with the reference.
    pub fn matches(&self, text: &str) -> bool {
        word_ngrams(text, self.ngram)
            .iter()
            .any(|g| self.grams.contains(g))
    }
}

/// Every per-document filter in order: the source's quality filters, then
/// decontamination against `reference` when there is one. `text` is
/// normalized.
pub fn judge(f: &Filters, reference: Option<&Reference>, text: &str) -> Result<(), Drop> {
    check(f, text)?;
    if reference.is_some_and(|r| r.matches(text)) {
        return Err(Drop::Decontaminated);
    }
    Ok(())
}

fn is_plain_punct(c: char) -> bool {
    matches!(
        c,
        '.' | ','
            | ';'
            | ':'
            | '!'
            | '?'
            | '\''
            | '"'
            | '('
            | ')'
            | '-'
            | '\u{2019}'
            | '\u{2018}'
            | '\u{201c}'
            | '\u{201d}'
            | '\u{2014}'
            | '\u{2013}'
    )
}

/// Apply the filters to a normalized document; the first failing rule, in
/// the order of [`Drop`], names the drop.
pub fn check(f: &Filters, text: &str) -> Result<(), Drop> {
    if text.trim().is_empty() {
        return Err(Drop::Empty);
    }
    let chars = text.chars().count() as u64;
    if f.min_chars.is_some_and(|m| chars < m) {
        return Err(Drop::MinChars);
    }
    if f.max_chars.is_some_and(|m| chars > m) {
        return Err(Drop::MaxChars);
    }
    // ASCII without vertical tabs splits the same on ASCII whitespace, and
    // its words have as many characters as bytes.
    let ascii = text.is_ascii() && !text.as_bytes().contains(&0x0b);
    let words: Vec<&str> = if ascii {
        text.split_ascii_whitespace().collect()
    } else {
        text.split_whitespace().collect()
    };
    let word_chars: Vec<usize> = if ascii {
        words.iter().map(|w| w.len()).collect()
    } else {
        words.iter().map(|w| w.chars().count()).collect()
    };
    let total_word_chars: usize = word_chars.iter().sum();
    if let Some([lo, hi]) = f.mean_word_length {
        let mean = total_word_chars as f64 / words.len().max(1) as f64;
        if mean < lo || mean > hi {
            return Err(Drop::MeanWordLength);
        }
    }
    if f.max_symbol_ratio.is_some() || f.max_digit_ratio.is_some() {
        let (mut non_space, mut symbols, mut digits) = (0usize, 0usize, 0usize);
        for c in text.chars() {
            if c.is_whitespace() {
                continue;
            }
            non_space += 1;
            if c.is_numeric() {
                digits += 1;
            } else if !c.is_alphabetic() && !is_plain_punct(c) {
                symbols += 1;
            }
        }
        let n = non_space.max(1) as f64;
        if f.max_symbol_ratio.is_some_and(|m| symbols as f64 / n > m) {
            return Err(Drop::SymbolRatio);
        }
        if f.max_digit_ratio.is_some_and(|m| digits as f64 / n > m) {
            return Err(Drop::DigitRatio);
        }
    }
    if let Some(m) = f.max_repeated_lines {
        let mut seen: HashSet<&str, std::hash::BuildHasherDefault<OneShotXxh3>> =
            HashSet::default();
        let (mut lines, mut repeated) = (0usize, 0usize);
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            lines += 1;
            if !seen.insert(line) {
                repeated += 1;
            }
        }
        if lines > 0 && repeated as f64 / lines as f64 > m {
            return Err(Drop::RepeatedLines);
        }
    }
    if total_word_chars == 0 {
        return Ok(());
    }
    let hashes: Vec<u64> = words.iter().map(|w| xxh3_64(w.as_bytes())).collect();
    let mut grams = NgramKeys::new(&hashes);
    // Word characters before word i (so any n-gram's characters in O(1)).
    let chars_before: Vec<usize> = std::iter::once(0)
        .chain(word_chars.iter().scan(0, |acc, &c| {
            *acc += c;
            Some(*acc)
        }))
        .collect();
    TABLE.with_borrow_mut(|table| {
        for rule in &f.top_ngrams {
            let n = rule.n;
            if words.len() < n {
                continue;
            }
            let keys = grams.keys(n);
            table.reset(keys.len());
            // Characters in the most frequent n-gram (ties: more
            // characters), kept up to date as counts grow rather than
            // found by a pass over the table.
            let (mut best, mut best_count) = (0usize, 0u32);
            for (i, &k) in keys.iter().enumerate() {
                let s = table.slot(k, i);
                s.count += 1;
                let (count, first) = (s.count, s.first as usize);
                best_count = best_count.max(count);
                best = best.max(count as usize * (chars_before[first + n] - chars_before[first]));
            }
            if best_count > 1 && best as f64 / total_word_chars as f64 > rule.max_fraction {
                return Err(Drop::TopNgram);
            }
        }
        let mut covered = vec![false; words.len()];
        // A repeated (n+1)-gram is made of repeated n-grams (keys equal up
        // to a 64-bit hash collision), so the words
        // that repeated n-grams cover include those of every longer one:
        // a fraction measured for n bounds every rule for a larger n, and
        // a rule whose limit is at or above that bound cannot drop the
        // document (most documents: Gopher's limits fall as n grows).
        let mut bounds: Vec<(usize, usize)> = Vec::new();
        for rule in &f.duplicate_ngrams {
            let n = rule.n;
            if words.len() < n {
                continue;
            }
            let bound = bounds
                .iter()
                .filter(|(m, _)| *m <= n)
                .map(|(_, chars)| *chars)
                .min();
            if bound.is_some_and(|b| b as f64 / total_word_chars as f64 <= rule.max_fraction) {
                continue;
            }
            let keys = grams.keys(n);
            table.reset(keys.len());
            covered.fill(false);
            for (i, &k) in keys.iter().enumerate() {
                let s = table.slot(k, i);
                s.count += 1;
                if s.count > 1 {
                    let first = s.first as usize;
                    covered[first..first + n].fill(true);
                    covered[i..i + n].fill(true);
                }
            }
            let dup_chars: usize = covered
                .iter()
                .zip(&word_chars)
                .filter(|(c, _)| **c)
                .map(|(_, n)| n)
                .sum();
            if dup_chars as f64 / total_word_chars as f64 > rule.max_fraction {
                return Err(Drop::DuplicateNgram);
            }
            bounds.push((n, dup_chars));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::hash::{BuildHasherDefault, Hasher};

    /// Hasher for keys that are already hashes (n-gram keys): passes them on.
    #[derive(Default)]
    struct PassThrough(u64);

    impl Hasher for PassThrough {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 << 8) | u64::from(*b);
            }
        }
        fn write_u64(&mut self, v: u64) {
            self.0 = v;
        }
    }

    type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<PassThrough>>;

    #[test]
    fn word_ngrams_ignore_case_and_punctuation() {
        let a = word_ngrams("The quick, brown fox -- jumps!", 3);
        let b = word_ngrams("the QUICK brown fox jumps", 3);
        assert_eq!(a.len(), 3);
        assert_eq!(a, b);
        assert!(word_ngrams("two words", 3).is_empty());
        let c = word_ngrams("the quick brown cat jumps", 3);
        assert_eq!(a[0], c[0]);
        assert_ne!(a[1], c[1]);
    }
    use twinhead_proto::dataset::NgramRule;

    #[test]
    fn normalize_is_the_plain_composition() {
        let plain = |t: &str| -> String {
            let t = t.replace("\r\n", "\n").replace('\r', "\n");
            t.nfc()
                .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
                .collect()
        };
        for t in [
            "plain ascii",
            "",
            "ascii\r\nwith\rcr\u{7}bell\u{0}",
            "ascii del\u{7f} unit\u{1f} sep, tab\t and ~ kept",
            "caf\u{e9} ok",
            "cafe\u{301}",
            "e\u{7}\u{301} control between",
            "\u{85}nel \u{9f} c1",
            "q\u{307}\u{323}",
            "\u{212b} \u{1100}\u{1161}",
            "日本語\u{3000}\u{1f44d}\u{1f3fd}",
            "\r\u{301}",
        ] {
            assert_eq!(normalize(t), plain(t), "{t:?}");
            assert_eq!(normalize_owned(t.to_string()), plain(t), "{t:?}");
        }
    }

    #[test]
    fn normalize_nfc_and_controls() {
        let s = "Cafe\u{301}\u{0007} ok\r\nnext\tline\u{0000}";
        assert_eq!(normalize(s), "Caf\u{e9} ok\nnext\tline");
    }

    #[test]
    fn dedup_key_ascii_path_is_the_general_one() {
        let general = |text: &str| -> u128 {
            let mut canon = String::new();
            for (i, w) in text.split_whitespace().enumerate() {
                if i > 0 {
                    canon.push(' ');
                }
                for c in w.chars() {
                    canon.extend(c.to_lowercase());
                }
            }
            xxh3_128(canon.as_bytes())
        };
        for t in [
            "",
            "  ",
            "Hello   World\n",
            "a\u{b}b",
            "A\u{c}B\rC\tD",
            "MiXeD 123 !?",
            "caf\u{c9} X",
        ] {
            assert_eq!(dedup_key(t), general(t), "{t:?}");
        }
    }

    #[test]
    fn dedup_key_ignores_case_and_spacing() {
        assert_eq!(dedup_key("Hello   World\n"), dedup_key("hello world"));
        assert_ne!(dedup_key("hello world"), dedup_key("hello worlds"));
    }

    fn f() -> Filters {
        Filters::default()
    }

    #[test]
    fn empty_is_dropped() {
        assert_eq!(check(&f(), "  \n\t"), Err(Drop::Empty));
    }

    #[test]
    fn min_and_max_chars() {
        let fl = Filters {
            min_chars: Some(5),
            max_chars: Some(10),
            ..f()
        };
        assert_eq!(check(&fl, "abcd"), Err(Drop::MinChars));
        assert_eq!(check(&fl, "abcdefghijk"), Err(Drop::MaxChars));
        assert_eq!(check(&fl, "abcde"), Ok(()));
        // Characters, not bytes.
        assert_eq!(check(&fl, "ééééé"), Ok(()));
    }

    #[test]
    fn mean_word_length() {
        let fl = Filters {
            mean_word_length: Some([3.0, 10.0]),
            ..f()
        };
        assert_eq!(check(&fl, "a b c d e f"), Err(Drop::MeanWordLength));
        assert_eq!(
            check(
                &fl,
                "supercalifragilisticexpialidocious antidisestablishment"
            ),
            Err(Drop::MeanWordLength)
        );
        assert_eq!(check(&fl, "the quick brown fox jumps"), Ok(()));
    }

    #[test]
    fn symbol_and_digit_ratio() {
        let fl = Filters {
            max_symbol_ratio: Some(0.1),
            max_digit_ratio: Some(0.2),
            ..f()
        };
        assert_eq!(check(&fl, "#### $$$$ @@@@ words"), Err(Drop::SymbolRatio));
        assert_eq!(check(&fl, "call 555 123 4567 now"), Err(Drop::DigitRatio));
        assert_eq!(check(&fl, "Plain prose, with punctuation: fine!"), Ok(()));
    }

    #[test]
    fn repeated_lines() {
        let fl = Filters {
            max_repeated_lines: Some(0.3),
            ..f()
        };
        assert_eq!(
            check(&fl, "buy now\nbuy now\nbuy now\nreal line"),
            Err(Drop::RepeatedLines)
        );
        assert_eq!(check(&fl, "one\ntwo\nthree\none"), Ok(()));
    }

    #[test]
    fn top_ngram() {
        let fl = Filters {
            top_ngrams: vec![NgramRule {
                n: 2,
                max_fraction: 0.2,
            }],
            ..f()
        };
        assert_eq!(
            check(&fl, "click here click here click here click here to win"),
            Err(Drop::TopNgram)
        );
        assert_eq!(
            check(
                &fl,
                "the whale swam far beyond the horizon of the sea today"
            ),
            Ok(())
        );
    }

    #[test]
    fn duplicate_ngram() {
        let fl = Filters {
            duplicate_ngrams: vec![NgramRule {
                n: 5,
                max_fraction: 0.15,
            }],
            ..f()
        };
        let spam = "this sentence is repeated here. this sentence is repeated here. and more";
        assert_eq!(check(&fl, spam), Err(Drop::DuplicateNgram));
        assert_eq!(
            check(
                &fl,
                "every word in this sentence is different from all other words used"
            ),
            Ok(())
        );
    }

    /// `check` as it was before the n-gram keys were computed incrementally:
    /// the drops must not change (datasets stay byte-identical).
    fn check_before(f: &Filters, text: &str) -> Result<(), Drop> {
        if text.trim().is_empty() {
            return Err(Drop::Empty);
        }
        let chars = text.chars().count() as u64;
        if f.min_chars.is_some_and(|m| chars < m) {
            return Err(Drop::MinChars);
        }
        if f.max_chars.is_some_and(|m| chars > m) {
            return Err(Drop::MaxChars);
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        let word_chars: Vec<usize> = words.iter().map(|w| w.chars().count()).collect();
        let total_word_chars: usize = word_chars.iter().sum();
        if let Some([lo, hi]) = f.mean_word_length {
            let mean = total_word_chars as f64 / words.len().max(1) as f64;
            if mean < lo || mean > hi {
                return Err(Drop::MeanWordLength);
            }
        }
        if f.max_symbol_ratio.is_some() || f.max_digit_ratio.is_some() {
            let (mut non_space, mut symbols, mut digits) = (0usize, 0usize, 0usize);
            for c in text.chars() {
                if c.is_whitespace() {
                    continue;
                }
                non_space += 1;
                if c.is_numeric() {
                    digits += 1;
                } else if !c.is_alphabetic() && !is_plain_punct(c) {
                    symbols += 1;
                }
            }
            let n = non_space.max(1) as f64;
            if f.max_symbol_ratio.is_some_and(|m| symbols as f64 / n > m) {
                return Err(Drop::SymbolRatio);
            }
            if f.max_digit_ratio.is_some_and(|m| digits as f64 / n > m) {
                return Err(Drop::DigitRatio);
            }
        }
        if let Some(m) = f.max_repeated_lines {
            let mut seen = HashSet::new();
            let (mut lines, mut repeated) = (0usize, 0usize);
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                lines += 1;
                if !seen.insert(line) {
                    repeated += 1;
                }
            }
            if lines > 0 && repeated as f64 / lines as f64 > m {
                return Err(Drop::RepeatedLines);
            }
        }
        if total_word_chars == 0 {
            return Ok(());
        }
        let hashes: Vec<u64> = words.iter().map(|w| xxh3_64(w.as_bytes())).collect();
        let ngram_key = |i: usize, n: usize| -> u64 {
            // Combine word hashes of [i, i+n) into one key.
            hashes[i..i + n]
                .iter()
                .fold(0x9E37_79B9_7F4A_7C15u64, |acc, h| {
                    (acc.rotate_left(5) ^ h).wrapping_mul(0x0100_0000_01B3)
                })
        };
        for rule in &f.top_ngrams {
            let n = rule.n;
            if words.len() < n {
                continue;
            }
            let mut counts: KeyMap<(usize, usize)> = KeyMap::default();
            for i in 0..=words.len() - n {
                let e = counts.entry(ngram_key(i, n)).or_insert((0, i));
                e.0 += 1;
            }
            // Characters in the most frequent n-gram (ties: more characters).
            let best = counts
                .values()
                .map(|&(count, first)| count * word_chars[first..first + n].iter().sum::<usize>())
                .max()
                .unwrap_or(0);
            let best_count = counts.values().map(|c| c.0).max().unwrap_or(0);
            if best_count > 1 && best as f64 / total_word_chars as f64 > rule.max_fraction {
                return Err(Drop::TopNgram);
            }
        }
        for rule in &f.duplicate_ngrams {
            let n = rule.n;
            if words.len() < n {
                continue;
            }
            let mut seen: KeyMap<usize> = KeyMap::default();
            let mut covered = vec![false; words.len()];
            for i in 0..=words.len() - n {
                let k = ngram_key(i, n);
                match seen.get(&k) {
                    Some(&first) => {
                        for flag in &mut covered[first..first + n] {
                            *flag = true;
                        }
                        for flag in &mut covered[i..i + n] {
                            *flag = true;
                        }
                    }
                    None => {
                        seen.insert(k, i);
                    }
                }
            }
            let dup_chars: usize = covered
                .iter()
                .zip(&word_chars)
                .filter(|(c, _)| **c)
                .map(|(_, n)| n)
                .sum();
            if dup_chars as f64 / total_word_chars as f64 > rule.max_fraction {
                return Err(Drop::DuplicateNgram);
            }
        }
        Ok(())
    }

    #[test]
    fn ngram_rules_match_the_previous_implementation() {
        use crate::rng::Rng;
        let vocab = [
            "a",
            "the",
            "whale",
            "click",
            "here",
            "sea",
            "ship",
            "of",
            "x",
            "longerword",
            "caf\u{e9}",
            "\u{b}",
            "日本",
            "\u{a0}",
        ];
        let mut rng = Rng::new(7, &[b"filters"]);
        let rules = |ns: &[usize], frac: f64| -> Vec<NgramRule> {
            ns.iter()
                .map(|&n| NgramRule {
                    n,
                    max_fraction: frac,
                })
                .collect()
        };
        let configs = [
            Filters {
                top_ngrams: rules(&[2, 3, 4], 0.2),
                duplicate_ngrams: rules(&[5, 6, 7, 8, 9, 10], 0.15),
                ..f()
            },
            Filters {
                top_ngrams: rules(&[4, 2], 0.5),
                duplicate_ngrams: rules(&[10, 5, 7], 0.4),
                ..f()
            },
            Filters {
                top_ngrams: rules(&[1, 3], 0.9),
                duplicate_ngrams: rules(&[1, 2], 0.9),
                ..f()
            },
            // Limits that fall, rise and repeat as n grows, in any order:
            // a shorter rule's fraction may bound a longer one's, never
            // the other way round.
            Filters {
                duplicate_ngrams: [
                    (5, 0.15),
                    (6, 0.14),
                    (7, 0.13),
                    (8, 0.12),
                    (9, 0.11),
                    (10, 0.1),
                ]
                .map(|(n, max_fraction)| NgramRule { n, max_fraction })
                .to_vec(),
                ..f()
            },
            Filters {
                duplicate_ngrams: [(6, 0.5), (2, 0.6), (4, 0.3), (3, 0.45), (8, 0.05), (5, 0.3)]
                    .map(|(n, max_fraction)| NgramRule { n, max_fraction })
                    .to_vec(),
                ..f()
            },
        ];
        let mut drops = BTreeMap::new();
        for i in 0..3000 {
            let words = rng.below(120) as usize;
            let spread = 1 + rng.below(vocab.len() as u64) as usize;
            let text: Vec<&str> = (0..words)
                .map(|_| vocab[rng.below(spread as u64) as usize])
                .collect();
            let text = text.join(if i % 2 == 0 { " " } else { "\n" });
            for c in &configs {
                let (now, before) = (check(c, &text), check_before(c, &text));
                assert_eq!(now, before, "{text:?}");
                *drops.entry(format!("{now:?}")).or_insert(0) += 1;
            }
        }
        // Every outcome is exercised.
        assert!(drops.len() >= 3, "{drops:?}");
        assert!(drops.contains_key("Err(DuplicateNgram)"), "{drops:?}");
    }
}
