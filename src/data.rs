//! Data: the handwritten digits set shipped in the repository, a loader for the MNIST IDX format,
//! seeded shuffling and batching, k-fold splits, and augmentation (random shifts of +-1 pixel and
//! Gaussian noise).

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::rng::Rng;

/// The UCI "Optical Recognition of Handwritten Digits" set (Alpaydin and Kaynak, 1998; CC BY 4.0),
/// as scikit-learn ships it: 1797 8x8 images with labels 0..=9.
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Examples as rows of `dim` features with class labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// `[n, dim]` row-major features.
    pub x: Vec<f32>,
    pub y: Vec<i32>,
    pub dim: usize,
    pub classes: usize,
    /// `(channels, height, width)` when the rows are images.
    pub image: Option<(usize, usize, usize)>,
}

fn data_error(what: impl Into<String>) -> Error {
    Error::Unsupported(what.into())
}

/// A line of CSV data that does not parse.
fn csv_error(problem: String) -> Error {
    Error::io("parse", "CSV data", problem)
}

impl Dataset {
    /// Checks sizes and labels.
    pub fn new(
        x: Vec<f32>,
        y: Vec<i32>,
        dim: usize,
        classes: usize,
        image: Option<(usize, usize, usize)>,
    ) -> Result<Self> {
        if y.is_empty() || dim == 0 {
            return Err(data_error(
                "empty data set: it needs at least one example with at least one feature",
            ));
        }
        if y.len().checked_mul(dim) != Some(x.len()) {
            return Err(Error::shape(
                "features",
                x.len(),
                y.len().saturating_mul(dim),
                format!("{} examples of {dim} features", y.len()),
            ));
        }
        if let Some((c, h, w)) = image {
            if c.checked_mul(h).and_then(|ch| ch.checked_mul(w)) != Some(dim) {
                return Err(data_error(format!(
                    "image shape {c}x{h}x{w} does not hold {dim} features"
                )));
            }
        }
        crate::ops::check_labels(&y, classes, i32::MIN)?;
        Ok(Dataset {
            x,
            y,
            dim,
            classes,
            image,
        })
    }

    /// The digits set shipped with the crate, pixels scaled by 1/16 to [0, 1].
    pub fn digits() -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
            .read_to_string(&mut text)
            .map_err(|e| Error::io("read", "the built-in digits.csv.gz", e))?;
        Self::from_csv(&text, 64, 10, 1.0 / 16.0, Some((1, 8, 8)))
    }

    /// Parses CSV rows of `dim` numbers then an integer label, scaling the features by `scale`.
    pub fn from_csv(
        text: &str,
        dim: usize,
        classes: usize,
        scale: f32,
        image: Option<(usize, usize, usize)>,
    ) -> Result<Self> {
        if !(scale.is_finite() && scale != 0.0) {
            return Err(csv_error(format!(
                "scale = {scale}: the features' scale must be finite and non-zero"
            )));
        }
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != dim + 1 {
                return Err(csv_error(format!(
                    "line {}: {} fields, expected {} features and a label",
                    i + 1,
                    fields.len(),
                    dim
                )));
            }
            for f in &fields[..dim] {
                let v: f32 = f
                    .parse()
                    .map_err(|_| csv_error(format!("line {}: {f:?} is not a number", i + 1)))?;
                if !(v * scale).is_finite() {
                    return Err(csv_error(format!(
                        "line {}: feature {f:?} is not finite (after the scale {scale})",
                        i + 1
                    )));
                }
                x.push(v * scale);
            }
            y.push(fields[dim].parse().map_err(|_| {
                csv_error(format!(
                    "line {}: label {:?} is not an integer",
                    i + 1,
                    fields[dim]
                ))
            })?);
        }
        Self::new(x, y, dim, classes, image)
    }

    /// A CSV file of your own (`--data FILE.csv`): each row the features then an integer label,
    /// comma-separated, plain or gzip-compressed (detected from the content, whatever the name).
    ///
    /// - A first row with a cell that does not parse as a number is a header and is skipped
    ///   ([`CsvFile::header`] says whether one was); every other row must be numbers. A header
    ///   whose cells are all numbers (`0,1,...,64`) is read as data: drop it, or name a column.
    /// - Every row has the first row's number of cells (blank lines are skipped); the last cell is
    ///   the label, the others are the features.
    /// - Features are any finite numbers, used as they are: unlike [`Dataset::digits`] (whose
    ///   pixels are divided by 16) and [`Dataset::from_idx`] (by 255), nothing is rescaled, so
    ///   scale them yourself (to about [0, 1], or standardised) and feed a teacher trained
    ///   elsewhere the same values it was trained on.
    /// - Labels are integers `0, 1, 2, ...` (`3` or `3.0`); the number of classes is the largest
    ///   label + 1 (at most [`MAX_CSV_CLASSES`]), and at least two distinct labels are needed.
    /// - `image`: `(channels, height, width)` when the rows are images (the features in `C, H, W`
    ///   order, as PyTorch flattens an `[N, C, H, W]` batch), for the CNN and augmentation;
    ///   `channels * height * width` must be the number of features.
    ///
    /// Errors: [`Error::Io`] naming the file (and the line and column) for a file that cannot be
    /// read or a cell that does not parse; [`Error::Config`] for data the pipeline cannot use
    /// (fewer than two classes, an image shape that does not fit the rows).
    pub fn from_csv_file(path: &Path, image: Option<(usize, usize, usize)>) -> Result<CsvFile> {
        let bytes = read_maybe_gz(path)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::io(
                "read",
                path,
                format!(
                    "not UTF-8 text (invalid byte at offset {}): --data takes a CSV file of \
                     numbers, plain or gzip-compressed",
                    e.utf8_error().valid_up_to()
                ),
            )
        })?;
        parse_csv_file(&text, path, image)
    }

    /// MNIST-format IDX files (images `0x00000803`, labels `0x00000801`; `.gz` is read too), pixels
    /// scaled by 1/255. For MNIST and Fashion-MNIST, which users bring themselves.
    pub fn from_idx(images: &Path, labels: &Path) -> Result<Self> {
        let img = read_maybe_gz(images)?;
        let lab = read_maybe_gz(labels)?;
        let bad = |path: &Path, problem: String| Error::io("read", path, problem);
        let be = |b: &[u8], path: &Path, at: usize| -> Result<usize> {
            b.get(at..at + 4)
                .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
                .ok_or_else(|| {
                    bad(
                        path,
                        format!("{} bytes, shorter than an IDX header", b.len()),
                    )
                })
        };
        let magic = be(&img, images, 0)?;
        if magic != 0x0803 {
            return Err(bad(
                images,
                format!(
                    "not an IDX image file (magic {magic:#010x}, expected 0x00000803): pass an \
                     MNIST-format images file such as train-images-idx3-ubyte(.gz)"
                ),
            ));
        }
        let magic = be(&lab, labels, 0)?;
        if magic != 0x0801 {
            return Err(bad(
                labels,
                format!(
                    "not an IDX label file (magic {magic:#010x}, expected 0x00000801): pass an \
                     MNIST-format labels file such as train-labels-idx1-ubyte(.gz)"
                ),
            ));
        }
        let (n, rows, cols) = (
            be(&img, images, 4)?,
            be(&img, images, 8)?,
            be(&img, images, 12)?,
        );
        let nl = be(&lab, labels, 4)?;
        if n != nl {
            return Err(bad(
                labels,
                format!(
                    "{nl} labels, but {} has {n} images: pass the labels of those images",
                    images.display()
                ),
            ));
        }
        // (the header's sizes checked before use: a product past usize would wrap to a short
        // slice that passes)
        let need = rows
            .checked_mul(cols)
            .and_then(|d| n.checked_mul(d).map(|b| (d, b)))
            .and_then(|(d, b)| b.checked_add(16).map(|e| (d, e)));
        let Some((dim, end)) = need else {
            return Err(bad(
                images,
                format!("a header of {n} images of {rows}x{cols}: its size overflows"),
            ));
        };
        let pixels = img.get(16..end).ok_or_else(|| {
            bad(
                images,
                format!(
                    "truncated: {n} images of {rows}x{cols} need {end} bytes, the file has {}",
                    img.len()
                ),
            )
        })?;
        let ys = lab.get(8..8 + n).ok_or_else(|| {
            bad(
                labels,
                format!(
                    "truncated: {n} labels need {} bytes, the file has {}",
                    8 + n,
                    lab.len()
                ),
            )
        })?;
        let classes = ys
            .iter()
            .map(|&v| v as usize + 1)
            .max()
            .unwrap_or(1)
            .max(10);
        Self::new(
            pixels.iter().map(|&p| p as f32 / 255.0).collect(),
            ys.iter().map(|&v| v as i32).collect(),
            dim,
            classes,
            Some((1, rows, cols)),
        )
    }

    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The rows at `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Result<Dataset> {
        if let Some(&i) = idx.iter().find(|&&i| i >= self.len()) {
            return Err(data_error(format!(
                "example {i} of a data set of {}: indices must be in range",
                self.len()
            )));
        }
        let mut x = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            x.extend_from_slice(&self.x[i * self.dim..(i + 1) * self.dim]);
        }
        Ok(Dataset {
            x,
            y: idx.iter().map(|&i| self.y[i]).collect(),
            dim: self.dim,
            classes: self.classes,
            image: self.image,
        })
    }
}

/// The most classes a CSV file may have (its largest label + 1).
pub const MAX_CSV_CLASSES: usize = 100_000;

/// What [`Dataset::from_csv_file`] read: the data, and whether the first row was a header.
#[derive(Clone, Debug)]
pub struct CsvFile {
    pub data: Dataset,
    pub header: bool,
}

/// A CSV cell as a number: `None` unless it parses as a (possibly non-finite) number.
fn csv_number(cell: &str) -> Option<f64> {
    cell.parse::<f64>().ok()
}

fn parse_csv_file(
    text: &str,
    path: &Path,
    image: Option<(usize, usize, usize)>,
) -> Result<CsvFile> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let at =
        |line: usize, problem: String| Error::io("parse", path, format!("line {line}: {problem}"));
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty());
    let Some((first_line, first)) = lines.next() else {
        return Err(Error::io(
            "read",
            path,
            "the file has no rows: --data takes rows of features then an integer label",
        ));
    };
    let first_cells: Vec<&str> = first.split(',').map(str::trim).collect();
    let cells = first_cells.len();
    if cells < 2 {
        let sep = [';', '\t', ' ']
            .into_iter()
            .find(|c| first.contains(*c))
            .map_or(String::new(), |c| {
                format!(" (it holds {c:?}: cells must be separated by commas)")
            });
        return Err(at(
            first_line,
            format!(
                "one cell{sep}; each row holds the features, then the label, separated by commas"
            ),
        ));
    }
    let header = first_cells.iter().any(|c| csv_number(c).is_none());
    let dim = cells - 1;
    let rows = (!header)
        .then_some((first_line, first))
        .into_iter()
        .chain(lines);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut seen = std::collections::BTreeSet::new();
    for (line, row) in rows {
        let fields: Vec<&str> = row.split(',').map(str::trim).collect();
        if fields.len() != cells {
            return Err(at(
                line,
                format!(
                    "{} cells, but line {first_line} has {cells}: every row must have the same \
                     number of cells ({dim} features, then the label)",
                    fields.len()
                ),
            ));
        }
        for (c, f) in fields[..dim].iter().enumerate() {
            let v: f32 = f.parse().map_err(|_| {
                let why = if f.is_empty() {
                    "is empty".to_string()
                } else {
                    format!("{f:?} is not a number")
                };
                at(
                    line,
                    format!(
                        "column {}: {why} (features must be numbers; only the first row may be \
                         a header)",
                        c + 1
                    ),
                )
            })?;
            if !v.is_finite() {
                return Err(at(
                    line,
                    format!(
                        "column {}: {f:?} is not a finite f32 (features must be finite numbers \
                         within +-3.4e38)",
                        c + 1
                    ),
                ));
            }
            x.push(v);
        }
        let cell = fields[dim];
        let label = csv_number(cell).ok_or_else(|| {
            at(
                line,
                format!(
                    "label {cell:?} (column {cells}, the last) is not a number: labels must be \
                     integers 0, 1, 2, ..."
                ),
            )
        })?;
        if !(label >= 0.0 && label.fract() == 0.0) {
            return Err(at(
                line,
                format!(
                    "label {cell:?} (column {cells}, the last) is not a class: labels must be \
                     integers 0, 1, 2, ... (the classes are 0 to the largest label)"
                ),
            ));
        }
        if label >= MAX_CSV_CLASSES as f64 {
            return Err(at(
                line,
                format!(
                    "label {cell:?} is too large: the classes are 0 to the largest label, and \
                     at most {MAX_CSV_CLASSES} are supported; number the classes from 0"
                ),
            ));
        }
        y.push(label as i32);
        seen.insert(label as i32);
    }
    if y.is_empty() {
        return Err(Error::io(
            "read",
            path,
            format!("only a header (line {first_line}) and no data rows"),
        ));
    }
    if seen.len() < 2 {
        return Err(Error::Config(format!(
            "{}: every one of the {} rows has label {}: distillation needs at least 2 classes \
             (labels 0, 1, ... in the last column)",
            path.display(),
            y.len(),
            y[0]
        )));
    }
    let classes = seen.last().map_or(0, |&l| l as usize + 1);
    if let Some((c, h, w)) = image {
        let size = c.checked_mul(h).and_then(|v| v.checked_mul(w));
        if size != Some(dim) {
            return Err(Error::Config(format!(
                "image shape {c}x{h}x{w} does not hold the {dim} features of each row of {}: \
                 give --image-shape CxHxW (or HxW) with C*H*W = {dim}, or drop it for the MLP",
                path.display()
            )));
        }
    }
    Ok(CsvFile {
        data: Dataset::new(x, y, dim, classes, image)?,
        header,
    })
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| {
        Error::io(
            "read",
            path,
            format!("{e} (check the path and that the file is readable)"),
        )
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| {
                Error::io(
                    "read",
                    path,
                    format!("bad gzip data: {e} (the download may be incomplete)"),
                )
            })?;
        return Ok(out);
    }
    Ok(raw)
}

/// `k` shuffled folds of `0..n`: `(train, test)` index lists, each example tested once.
pub fn kfold(n: usize, k: usize, rng: &mut Rng) -> Result<Vec<(Vec<usize>, Vec<usize>)>> {
    if k < 2 || k > n {
        return Err(data_error(format!(
            "{k} folds of {n} examples: the number of folds must be in 2..={n}"
        )));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    Ok((0..k)
        .map(|f| {
            let (lo, hi) = (f * n / k, (f + 1) * n / k);
            let test = idx[lo..hi].to_vec();
            let train = idx[..lo].iter().chain(&idx[hi..]).copied().collect();
            (train, test)
        })
        .collect())
}

/// Splits `idx` into a labelled part of about `fraction` of it, stratified by class (each class
/// present keeps `round(fraction * its count)` labels, at least one), and the unlabelled rest,
/// after a seeded shuffle.
pub fn label_split(
    data: &Dataset,
    idx: &[usize],
    fraction: f64,
    rng: &mut Rng,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(Error::Param {
            name: "label_fraction",
            value: fraction,
            hint: "the labelled fraction must be in (0, 1]",
        });
    }
    // (the data set's public fields may have been changed since Dataset::new checked them)
    for &i in idx {
        let y = data.y.get(i).copied().ok_or_else(|| {
            data_error(format!(
                "example {i} of a data set of {}: indices must be in range",
                data.len()
            ))
        })?;
        if y < 0 || y as usize >= data.classes {
            return Err(data_error(format!(
                "example {i} has label {y}, not a class in 0..{}",
                data.classes
            )));
        }
    }
    let mut idx = idx.to_vec();
    rng.shuffle(&mut idx);
    let mut by_class = vec![Vec::new(); data.classes];
    for &i in &idx {
        by_class[data.y[i] as usize].push(i);
    }
    let mut labelled = Vec::new();
    let mut rest = Vec::new();
    for members in by_class.iter().filter(|m| !m.is_empty()) {
        let k = ((members.len() as f64 * fraction).round() as usize).clamp(1, members.len());
        labelled.extend_from_slice(&members[..k]);
        rest.extend_from_slice(&members[k..]);
    }
    rng.shuffle(&mut labelled);
    rng.shuffle(&mut rest);
    Ok((labelled, rest))
}

/// Seeded mini-batches of `idx`, reshuffled each epoch; the last batch may be short.
pub fn batches(idx: &[usize], batch: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut v = idx.to_vec();
    rng.shuffle(&mut v);
    v.chunks(batch.max(1)).map(|c| c.to_vec()).collect()
}

/// Augmentation of image rows in place: each image shifted by -1, 0 or +1 pixel in each direction
/// (zeros shifted in), then Gaussian noise of standard deviation `noise` added.
pub fn augment(
    x: &mut [f32],
    image: (usize, usize, usize),
    shift: bool,
    noise: f32,
    rng: &mut Rng,
) -> Result<()> {
    let (c, h, w) = image;
    let dim = c
        .checked_mul(h)
        .and_then(|ch| ch.checked_mul(w))
        .filter(|&d| d > 0)
        .ok_or_else(|| data_error(format!("image shape {c}x{h}x{w}: each size must be >= 1")))?;
    if !x.len().is_multiple_of(dim) {
        return Err(data_error(format!(
            "{} values are not whole {c}x{h}x{w} images",
            x.len()
        )));
    }
    if !(noise.is_finite() && noise >= 0.0) {
        return Err(Error::Param {
            name: "noise",
            value: noise as f64,
            hint: "the noise is a standard deviation: finite and >= 0",
        });
    }
    for img in x.chunks_mut(dim) {
        if shift {
            let (dy, dx) = (rng.below(3) as isize - 1, rng.below(3) as isize - 1);
            let src = img.to_vec();
            for ch in 0..c {
                for r in 0..h as isize {
                    for q in 0..w as isize {
                        let (sr, sq) = (r - dy, q - dx);
                        let v = if sr >= 0 && sr < h as isize && sq >= 0 && sq < w as isize {
                            src[ch * h * w + sr as usize * w + sq as usize]
                        } else {
                            0.0
                        };
                        img[ch * h * w + r as usize * w + q as usize] = v;
                    }
                }
            }
        }
        if noise > 0.0 {
            for v in img.iter_mut() {
                *v += noise * rng.normal() as f32;
            }
        }
    }
    Ok(())
}
