//! The embedded UCI optical handwritten digits dataset and row subsetting.

use std::io::Read;

use ndarray::{Array2, Axis};

use super::{Result, SimError};

/// The gzip'd CSV shipped with the crate: 1797 lines, each 64 pixel counts
/// (`0..=16`) followed by the label (`0..=9`), comma-separated.
static DIGITS_CSV_GZ: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz"));

/// Largest pixel count in the raw data; features are `pixel / MAX_PIXEL`.
const MAX_PIXEL: u64 = 16;

/// A labelled classification dataset of 8x8 digit images.
///
/// Invariants kept by every constructor in this module (the fields are public,
/// so [`Dataset::check`] re-validates a hand-built value):
/// `features.nrows() == labels.len()`, `features.ncols() == NUM_FEATURES`,
/// every label `< NUM_CLASSES`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Feature matrix, shape `[n, 64]`, `f32`, row-major: row `i` is image `i`
    /// flattened row by row, each pixel count divided by 16 so it lies in
    /// `[0, 1]`.
    pub features: Array2<f32>,
    /// Class labels, length `n`, `u8` in `0..=9` (the digit shown).
    pub labels: Vec<u8>,
}

impl Dataset {
    /// Number of input features per example (8x8 pixels).
    pub const NUM_FEATURES: usize = 64;
    /// Number of classes (digits 0..9).
    pub const NUM_CLASSES: usize = 10;

    /// Parses the embedded digits file into a [`Dataset`] of 1797 examples:
    /// `features` is `[1797, 64]` `f32` in `[0, 1]`, `labels` is 1797 `u8`s in
    /// `0..=9`, in file order.
    ///
    /// # Errors
    /// [`SimError::Decompress`] if the gzip stream is corrupt or not UTF-8,
    /// and a line-numbered [`SimError`] for any malformed line (wrong field
    /// count, non-integer field, pixel outside `0..=16`, label outside `0..=9`),
    /// or [`SimError::Empty`] if the file has no rows.
    pub fn digits() -> Result<Dataset> {
        parse_csv_gz(DIGITS_CSV_GZ)
    }

    /// Number of examples `n`.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset has no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The examples at positions `idx`, in that order (repeats allowed):
    /// `features` is `[k, 64]` `f32`, `labels` has length `k`, where `k` is
    /// the number of indices in range.
    ///
    /// Indices `>= self.len()` are skipped rather than panicking; callers that
    /// need to detect them can compare the result's length with `idx.len()`.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let n = self.len().min(self.features.nrows());
        let idx: Vec<usize> = idx.iter().copied().filter(|&i| i < n).collect();
        Dataset {
            features: self.features.select(Axis(0), &idx),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// Checks the struct invariants: `features` is `[labels.len(), 64]`,
    /// all features are finite and every label is `< 10`.
    ///
    /// # Errors
    /// [`SimError::Shape`] describing the first violation found.
    pub fn check(&self) -> Result<()> {
        let (rows, cols) = self.features.dim();
        if cols != Self::NUM_FEATURES || rows != self.labels.len() {
            return Err(SimError::Shape(format!(
                "features are [{rows}, {cols}] but expected [{}, {}]",
                self.labels.len(),
                Self::NUM_FEATURES
            )));
        }
        if let Some(&bad) = self.labels.iter().find(|&&l| usize::from(l) >= Self::NUM_CLASSES) {
            return Err(SimError::Shape(format!("label {bad} is not below {}", Self::NUM_CLASSES)));
        }
        if self.features.iter().any(|v| !v.is_finite()) {
            return Err(SimError::Shape("features contain a non-finite value".into()));
        }
        Ok(())
    }
}

/// Decompresses `bytes` (gzip) and parses the result with [`parse_csv`].
pub(super) fn parse_csv_gz(bytes: &[u8]) -> Result<Dataset> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes).read_to_string(&mut text).map_err(SimError::Decompress)?;
    parse_csv(&text)
}

/// Parses digits CSV text: one example per non-blank line, 64 integer pixel
/// counts in `0..=16` then an integer label in `0..=9`, comma-separated
/// (surrounding whitespace and `\r` are tolerated).
pub(super) fn parse_csv(text: &str) -> Result<Dataset> {
    let expected = Dataset::NUM_FEATURES + 1;
    let mut pixels: Vec<f32> = Vec::new();
    let mut labels: Vec<u8> = Vec::new();
    for (line_idx, raw_line) in text.lines().enumerate() {
        let line_no = line_idx + 1;
        let line = raw_line.trim();
        if line.is_empty() {
            continue;
        }
        let found = line.split(',').count();
        if found != expected {
            return Err(SimError::FieldCount { line: line_no, expected, found });
        }
        for (field_idx, field) in line.split(',').enumerate() {
            let field_no = field_idx + 1;
            let field = field.trim();
            let value: u64 = field.parse().map_err(|_| SimError::NotAnInteger {
                line: line_no,
                field: field_no,
                value: field.chars().take(32).collect(),
            })?;
            if field_idx < Dataset::NUM_FEATURES {
                if value > MAX_PIXEL {
                    return Err(SimError::PixelOutOfRange { line: line_no, field: field_no, value });
                }
                // Exact: both operands are small integers.
                pixels.push(value as f32 / MAX_PIXEL as f32);
            } else {
                match u8::try_from(value) {
                    Ok(label) if usize::from(label) < Dataset::NUM_CLASSES => labels.push(label),
                    _ => return Err(SimError::LabelOutOfRange { line: line_no, value }),
                }
            }
        }
    }
    if labels.is_empty() {
        return Err(SimError::Empty);
    }
    let features = Array2::from_shape_vec((labels.len(), Dataset::NUM_FEATURES), pixels)
        .expect("each accepted line pushes exactly NUM_FEATURES pixels and one label");
    Ok(Dataset { features, labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_parses_with_expected_shape_and_class_balance() {
        let ds = Dataset::digits().expect("embedded data parses");
        assert_eq!(ds.len(), 1797);
        assert!(!ds.is_empty());
        assert_eq!(ds.features.dim(), (1797, Dataset::NUM_FEATURES));
        assert!(ds.features.iter().all(|&v| (0.0..=1.0).contains(&v)));
        let mut counts = [0usize; Dataset::NUM_CLASSES];
        for &l in &ds.labels {
            assert!(usize::from(l) < Dataset::NUM_CLASSES);
            counts[usize::from(l)] += 1;
        }
        for (class, &c) in counts.iter().enumerate() {
            assert!((170..=190).contains(&c), "class {class} has {c} examples");
        }
        ds.check().expect("parsed data satisfies invariants");
        // First row of the file: pixel 3 is 5, pixel 4 is 13, label 0.
        assert_eq!(ds.features[[0, 2]], 5.0 / 16.0);
        assert_eq!(ds.features[[0, 3]], 13.0 / 16.0);
        assert_eq!(ds.labels[0], 0);
    }

    fn line(pixel: &str, label: &str) -> String {
        let mut fields = vec!["0"; Dataset::NUM_FEATURES];
        fields[5] = pixel;
        fields.push(label);
        fields.join(",")
    }

    #[test]
    fn parser_reports_bad_lines() {
        let good = line("16", "9");
        let ok = parse_csv(&format!("{good}\r\n\n{good}\n")).expect("valid text");
        assert_eq!(ok.len(), 2);
        assert_eq!(ok.features[[1, 5]], 1.0);

        let short = format!("{good}\n1,2,3\n");
        assert!(matches!(parse_csv(&short), Err(SimError::FieldCount { line: 2, expected: 65, found: 3 })));
        assert!(matches!(parse_csv(&line("x", "1")), Err(SimError::NotAnInteger { line: 1, field: 6, .. })));
        assert!(matches!(parse_csv(&line("-1", "1")), Err(SimError::NotAnInteger { field: 6, .. })));
        assert!(matches!(
            parse_csv(&line("17", "1")),
            Err(SimError::PixelOutOfRange { field: 6, value: 17, .. })
        ));
        assert!(matches!(parse_csv(&line("1", "10")), Err(SimError::LabelOutOfRange { value: 10, .. })));
        assert!(matches!(parse_csv(&line("1", "300")), Err(SimError::LabelOutOfRange { value: 300, .. })));
        assert!(matches!(parse_csv("\n \n"), Err(SimError::Empty)));
        assert!(matches!(parse_csv_gz(b"not gzip at all"), Err(SimError::Decompress(_))));
    }

    #[test]
    fn subset_selects_rows_and_skips_out_of_range() {
        let ds = Dataset::digits().expect("embedded data parses");
        let sub = ds.subset(&[5, 0, 5, 99_999]);
        assert_eq!(sub.len(), 3);
        assert_eq!(sub.features.row(0), ds.features.row(5));
        assert_eq!(sub.features.row(1), ds.features.row(0));
        assert_eq!(sub.labels, vec![ds.labels[5], ds.labels[0], ds.labels[5]]);
        assert!(ds.subset(&[]).is_empty());
    }

    #[test]
    fn check_rejects_malformed_datasets() {
        let bad_cols = Dataset { features: Array2::zeros((2, 3)), labels: vec![0, 1] };
        assert!(matches!(bad_cols.check(), Err(SimError::Shape(_))));
        let bad_label = Dataset { features: Array2::zeros((1, Dataset::NUM_FEATURES)), labels: vec![10] };
        assert!(matches!(bad_label.check(), Err(SimError::Shape(_))));
    }
}
