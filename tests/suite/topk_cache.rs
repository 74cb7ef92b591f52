//! The top-k teacher cache (`src/topk_cache.rs`): written and read back in chunks of rows (the
//! same indices and bf16 values, whatever the chunk sizes), a valid safetensors file, the
//! stored probabilities never above 1, and the errors of a file that is not a cache.

use distillation::half::bf16;
use distillation::topk_cache::{top_k_logprobs, TopKReader, TopKWriter};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("distillation-topk-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn logits(rows: usize, classes: usize) -> Vec<f32> {
    (0..rows * classes)
        .map(|i| ((i * 7919 + 13) % 1009) as f32 / 50.0 - 10.0)
        .collect()
}

#[test]
fn round_trip_in_chunks() {
    let dir = temp_dir("round-trip");
    let (rows, classes, k) = (1000, 37, 5);
    let x = logits(rows, classes);
    let (idx, val) = top_k_logprobs(&x, classes, k).unwrap();
    let path = dir.join("t.safetensors");
    let mut w = TopKWriter::create(&path, rows, k, classes).unwrap();
    // Chunks of 1, 300, 256 and the rest.
    let mut at = 0;
    for n in [1usize, 300, 256, rows - 557] {
        w.write_rows(&idx[at * k..(at + n) * k], &val[at * k..(at + n) * k])
            .unwrap();
        at += n;
    }
    w.finish().unwrap();
    let mut r = TopKReader::open(&path).unwrap();
    assert_eq!((r.rows(), r.k(), r.classes()), (rows, k, classes));
    let (mut gi, mut gv) = (Vec::new(), Vec::new());
    for start in (0..rows).step_by(333) {
        let (i, v) = r.read_rows(start, 333.min(rows - start)).unwrap();
        gi.extend(i);
        gv.extend(v);
    }
    assert_eq!(gi, idx);
    assert_eq!(gv, val);
    // The safetensors crate reads the same tensors.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ti = st.tensor("indices").unwrap();
    assert_eq!(ti.shape(), &[rows, k]);
    assert_eq!(ti.dtype(), safetensors::Dtype::I32);
    assert_eq!(bytemuck::cast_slice::<u8, i32>(ti.data()), &idx[..]);
    assert_eq!(
        st.tensor("values").unwrap().dtype(),
        safetensors::Dtype::BF16
    );
    // The largest first, and no row's stored probabilities above 1.
    for (ri, rv) in idx.chunks(k).zip(val.chunks(k)) {
        assert!(rv.windows(2).all(|w| w[0] >= w[1]));
        assert!(ri.iter().all(|&j| (0..classes as i32).contains(&j)));
        let sum: f64 = rv.iter().map(|v| (v.to_f64()).exp()).sum();
        assert!(sum <= 1.0, "{sum}");
    }
    // A top-k holding nearly all the mass: rounded down, still at most 1.
    let (_, v) = top_k_logprobs(&[0.4, 0.0, -30.0], 3, 2).unwrap();
    assert!(v.iter().map(|v: &bf16| v.to_f64().exp()).sum::<f64>() <= 1.0);
}

#[test]
fn errors() {
    let dir = temp_dir("errors");
    let path = dir.join("bad.safetensors");
    std::fs::write(&path, b"not a cache").unwrap();
    assert!(TopKReader::open(&path).is_err());
    let mut w = TopKWriter::create(&path, 2, 2, 3).unwrap();
    assert!(w.write_rows(&[0, 1, 2], &[bf16::ZERO; 3]).is_err());
    w.write_rows(&[0, 1], &[bf16::ZERO; 2]).unwrap();
    assert!(w.finish().is_err());
    assert!(TopKWriter::create(&path, 2, 4, 3).is_err());
    // k past what a sparse loss reads; sizes past 2^64 bytes.
    assert!(TopKWriter::create(&path, 2, 1025, 5000).is_err());
    assert!(TopKWriter::create(&path, usize::MAX / 2, 8, 100).is_err());
    // top_k_logprobs: no classes, a partial row, k = 0 or past the classes.
    assert!(top_k_logprobs(&[0.0; 4], 0, 1).is_err());
    assert!(top_k_logprobs(&[0.0; 5], 3, 1).is_err());
    assert!(top_k_logprobs(&[0.0; 6], 3, 0).is_err());
    assert!(top_k_logprobs(&[0.0; 6], 3, 4).is_err());
}

/// A safetensors file with the cache's header for `[rows, k]` (offsets as a cache's) and `data`
/// bytes after it.
fn crafted(path: &std::path::Path, rows: u64, k: u64, classes: &str, shape: &str, data: usize) {
    let n = rows.wrapping_mul(k);
    let json = format!(
        "{{\"__metadata__\":{{\"format\":\"distillation-topk\",\"classes\":\"{classes}\"}},\
         \"indices\":{{\"dtype\":\"I32\",\"shape\":{shape},\"data_offsets\":[0,{}]}},\
         \"values\":{{\"dtype\":\"BF16\",\"shape\":{shape},\"data_offsets\":[{},{}]}}}}",
        n.wrapping_mul(4),
        n.wrapping_mul(4),
        n.wrapping_mul(6)
    );
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json.as_bytes());
    bytes.extend(vec![0u8; data]);
    std::fs::write(path, bytes).unwrap();
}

/// A header's sizes are checked against the file before anything is allocated: a header of
/// 2^40 entries over a few bytes, sizes whose product overflows, k past the classes or 1024,
/// a dimension that is not an integer, a truncated file: errors, never an abort.
#[test]
fn a_lying_header_is_an_error() {
    let dir = temp_dir("lying-header");
    let path = dir.join("lie.safetensors");
    let k40 = 1u64 << 40;
    let cases: Vec<(u64, u64, &str, String, usize)> = vec![
        (1, k40, "2000000000000", format!("[1,{k40}]"), 64),
        (
            1 << 33,
            1 << 31,
            "4000000000",
            format!("[{},{}]", 1u64 << 33, 1u64 << 31),
            64,
        ),
        (1 << 62, 8, "100", format!("[{},8]", 1u64 << 62), 64),
        (1 << 40, 8, "100", format!("[{},8]", 1u64 << 40), 64),
        (2, 4, "3", "[2,4]".into(), 48),
        (2, 2000, "5000", "[2,2000]".into(), 24000),
        (2, 2, "3", "[2,2.5]".into(), 24),
        (3, 2, "3", "[3,2]".into(), 35),
    ];
    for (rows, k, classes, shape, data) in cases {
        crafted(&path, rows, k, classes, &shape, data);
        assert!(
            TopKReader::open(&path).is_err(),
            "rows {rows}, k {k}, shape {shape}, {data} data bytes: opened"
        );
    }
    // The same header with its data whole opens and reads.
    crafted(&path, 3, 2, "3", "[3,2]", 36);
    let mut r = TopKReader::open(&path).unwrap();
    assert_eq!((r.rows(), r.k(), r.classes()), (3, 2, 3));
    assert!(r.read_rows(2, 1).is_ok());
    assert!(r.read_rows(2, usize::MAX).is_err());
    assert!(r.read_rows(usize::MAX, 2).is_err());
}
