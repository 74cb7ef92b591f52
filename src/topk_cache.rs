//! A top-k teacher cache (`docs/LOSSES.md` section 10's sparse teacher, stored): a safetensors
//! file of two tensors, `indices` `[N, k]` I32 and `values` `[N, k]` BF16 (the teacher's
//! log-probabilities at T = 1 at those classes), with `__metadata__` holding the class count.
//! Written and read in chunks of rows (the header first, each tensor at its offset), so a cache
//! larger than memory streams; the file is a plain safetensors file (`safetensors::SafeTensors`
//! reads it, `tests` check that).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::bf16;

use crate::error::{Error, Result};
use crate::ops::sparse::MAX_TOP_K;

const FORMAT: &str = "distillation-topk";

/// Streams a cache to disk, rows in order.
pub struct TopKWriter {
    file: File,
    path: PathBuf,
    rows: usize,
    k: usize,
    data: u64,
    written: usize,
}

/// The bytes of the cache's data for `rows x k` entries (4 per index, 2 per value), or
/// [`Error::Limit`] past `u64`.
fn data_bytes(rows: usize, k: usize) -> Result<u64> {
    (rows as u64)
        .checked_mul(k as u64)
        .and_then(|n| n.checked_mul(6))
        .ok_or_else(|| {
            Error::Limit(format!(
                "a top-k cache of {rows} rows of k = {k}: its size passes 2^64 bytes"
            ))
        })
}

/// The header of a cache of `rows x k` entries over `classes` classes (sizes checked by
/// [`data_bytes`]).
fn header(rows: usize, k: usize, classes: usize) -> Vec<u8> {
    let n = rows as u64 * k as u64;
    let json = format!(
        "{{\"__metadata__\":{{\"format\":\"{FORMAT}\",\"classes\":\"{classes}\"}},\
         \"indices\":{{\"dtype\":\"I32\",\"shape\":[{rows},{k}],\"data_offsets\":[0,{}]}},\
         \"values\":{{\"dtype\":\"BF16\",\"shape\":[{rows},{k}],\"data_offsets\":[{},{}]}}}}",
        4 * n,
        4 * n,
        6 * n
    );
    let mut bytes = json.into_bytes();
    while bytes.len() % 8 != 0 {
        bytes.push(b' ');
    }
    let mut out = (bytes.len() as u64).to_le_bytes().to_vec();
    out.extend(bytes);
    out
}

impl TopKWriter {
    /// Creates the file for `rows` rows of `k` entries over `classes` classes.
    pub fn create(path: &Path, rows: usize, k: usize, classes: usize) -> Result<TopKWriter> {
        if rows == 0 || k == 0 || k > classes || k > MAX_TOP_K {
            return Err(Error::Unsupported(format!(
                "a top-k cache needs rows >= 1 and 1 <= k <= min(classes, {MAX_TOP_K}) (got \
                 {rows} rows, k = {k}, {classes} classes): a sparse loss reads at most \
                 {MAX_TOP_K} entries per row"
            )));
        }
        let bytes = data_bytes(rows, k)?;
        let io = |a, e: std::io::Error| Error::io(a, path, e);
        let mut file = File::create(path).map_err(|e| io("create", e))?;
        let h = header(rows, k, classes);
        file.write_all(&h).map_err(|e| io("write", e))?;
        let data = h.len() as u64;
        file.set_len(data + bytes).map_err(|e| io("write", e))?;
        Ok(TopKWriter {
            file,
            path: path.to_path_buf(),
            rows,
            k,
            data,
            written: 0,
        })
    }

    /// Appends the next rows: `indices` and `values` of `rows * k` entries each.
    pub fn write_rows(&mut self, indices: &[i32], values: &[bf16]) -> Result<()> {
        let k = self.k;
        if indices.len() != values.len() || !indices.len().is_multiple_of(k) {
            return Err(Error::shape(
                "top-k values",
                values.len(),
                indices.len(),
                format!("indices and values of whole rows of k = {k}"),
            ));
        }
        let n = indices.len() / k;
        if n > self.rows - self.written {
            return Err(Error::Unsupported(format!(
                "{} rows written to a cache of {}",
                self.written + n,
                self.rows
            )));
        }
        let io = |e: std::io::Error| Error::io("write", &self.path, e);
        let at = (self.written * k) as u64;
        self.file
            .seek(SeekFrom::Start(self.data + 4 * at))
            .map_err(io)?;
        self.file
            .write_all(bytemuck::cast_slice(indices))
            .map_err(io)?;
        self.file
            .seek(SeekFrom::Start(
                self.data + 4 * (self.rows * k) as u64 + 2 * at,
            ))
            .map_err(io)?;
        self.file
            .write_all(bytemuck::cast_slice(values))
            .map_err(io)?;
        self.written += n;
        Ok(())
    }

    /// Checks that every row was written and flushes the file.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.rows {
            return Err(Error::io(
                "write",
                &self.path,
                format!("{} of {} rows written", self.written, self.rows),
            ));
        }
        self.file
            .flush()
            .map_err(|e| Error::io("write", &self.path, e))
    }
}

/// Reads a cache in chunks of rows.
pub struct TopKReader {
    file: File,
    path: PathBuf,
    rows: usize,
    k: usize,
    classes: usize,
    data: u64,
}

impl TopKReader {
    /// Opens a cache written by [`TopKWriter`] (or any safetensors file with the same two
    /// tensors and the `classes` metadata).
    pub fn open(path: &Path) -> Result<TopKReader> {
        let bad = |why: String| {
            Error::io(
                "read",
                path,
                format!("{why}: not a top-k cache (indices I32 [N, k], values BF16 [N, k])"),
            )
        };
        let mut file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|e| bad(format!("no header ({e})")))?;
        let len = u64::from_le_bytes(len);
        if len > 1 << 20 {
            return Err(bad(format!("a header of {len} bytes")));
        }
        let mut json = vec![0u8; len as usize];
        file.read_exact(&mut json)
            .map_err(|e| bad(format!("a short header ({e})")))?;
        let h: serde_json::Value =
            serde_json::from_slice(&json).map_err(|e| bad(format!("header: {e}")))?;
        let tensor = |name: &str, dtype: &str| -> Result<(usize, usize, u64)> {
            let t = &h[name];
            if t["dtype"] != dtype {
                return Err(bad(format!("{name} is not {dtype}")));
            }
            // (a dimension that is not an integer in usize is an error, not dropped)
            let dims: Option<Vec<usize>> = t["shape"].as_array().and_then(|a| {
                a.iter()
                    .map(|v| v.as_u64().and_then(|v| usize::try_from(v).ok()))
                    .collect()
            });
            let start = t["data_offsets"][0].as_u64();
            match (dims.as_deref(), start) {
                (Some(&[n, k]), Some(s)) => Ok((n, k, s)),
                _ => Err(bad(format!("{name}'s shape or offsets"))),
            }
        };
        let (rows, k, i0) = tensor("indices", "I32")?;
        let (vr, vk, v0) = tensor("values", "BF16")?;
        let classes = h["__metadata__"]["classes"]
            .as_str()
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| bad("no classes in __metadata__".into()))?;
        if rows == 0 || k == 0 || k > classes || k > MAX_TOP_K {
            return Err(bad(format!(
                "{rows} rows of k = {k} over {classes} classes (a cache has rows >= 1 and 1 <= \
                 k <= min(classes, {MAX_TOP_K}))"
            )));
        }
        let bytes = data_bytes(rows, k).map_err(|e| bad(e.to_string()))?;
        if (vr, vk) != (rows, k) || i0 != 0 || v0 != bytes / 6 * 4 {
            return Err(bad("indices and values do not match".into()));
        }
        // Every row's data in the file before anything is allocated for it.
        let file_len = file
            .metadata()
            .map_err(|e| Error::io("read", path, e))?
            .len();
        if file_len < 8 + len + bytes {
            return Err(bad(format!(
                "{file_len} bytes, short of the {} its header describes (a truncated file?)",
                8 + len + bytes
            )));
        }
        Ok(TopKReader {
            file,
            path: path.to_path_buf(),
            rows,
            k,
            classes,
            data: 8 + len,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Rows `start..start + count`: their indices and values.
    pub fn read_rows(&mut self, start: usize, count: usize) -> Result<(Vec<i32>, Vec<bf16>)> {
        if start > self.rows || count > self.rows - start {
            return Err(Error::io(
                "read",
                &self.path,
                format!(
                    "rows {start}..{} of a cache of {}",
                    start.saturating_add(count),
                    self.rows
                ),
            ));
        }
        let (k, n) = (self.k, count * self.k);
        let io = |e: std::io::Error| Error::io("read", &self.path, e);
        let mut idx = vec![0i32; n];
        let mut val = vec![bf16::ZERO; n];
        self.file
            .seek(SeekFrom::Start(self.data + 4 * (start * k) as u64))
            .map_err(io)?;
        self.file
            .read_exact(bytemuck::cast_slice_mut(&mut idx))
            .map_err(io)?;
        self.file
            .seek(SeekFrom::Start(
                self.data + 4 * (self.rows * k) as u64 + 2 * (start * k) as u64,
            ))
            .map_err(io)?;
        self.file
            .read_exact(bytemuck::cast_slice_mut(&mut val))
            .map_err(io)?;
        Ok((idx, val))
    }
}

/// Each row's `k` largest log-probabilities of `logits` (`[rows, classes]`, at T = 1), largest
/// first (ties to the lower class), as a cache stores them: each rounded down to bf16 (toward
/// `-inf`), so that the stored probabilities never sum above 1 (round to nearest would put a
/// top-k holding most of the mass up to 0.4% above it, past the check's tolerance).
/// `logits` must be whole rows of `classes >= 1`, and `1 <= k <= classes`.
pub fn top_k_logprobs(logits: &[f32], classes: usize, k: usize) -> Result<(Vec<i32>, Vec<bf16>)> {
    if classes == 0 || logits.is_empty() || !logits.len().is_multiple_of(classes) {
        return Err(Error::shape(
            "logits",
            logits.len(),
            logits.len().div_ceil(classes.max(1)).max(1) * classes.max(1),
            format!("[rows, classes] row-major with rows >= 1 and classes = {classes} >= 1"),
        ));
    }
    if k == 0 || k > classes {
        return Err(Error::Param {
            name: "k",
            value: k as f64,
            hint: "a row's top k needs 1 <= k <= classes",
        });
    }
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    for row in logits.chunks(classes) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &j in &order[..k] {
            idx.push(j as i32);
            val.push(bf16_down(row[j] as f64 - lse));
        }
    }
    Ok((idx, val))
}

/// `v` rounded to a bf16 at most `v`.
fn bf16_down(v: f64) -> bf16 {
    let b = bf16::from_f64(v);
    if b.to_f64() <= v || !v.is_finite() {
        return b;
    }
    // The next bf16 toward -inf: one more in the magnitude of a negative value, one less of a
    // positive one (0 goes to the smallest negative subnormal).
    let bits = b.to_bits();
    bf16::from_bits(match bits {
        0 | 0x8000 => 0x8001,
        _ if bits & 0x8000 != 0 => bits + 1,
        _ => bits - 1,
    })
}
