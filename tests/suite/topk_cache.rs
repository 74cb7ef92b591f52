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
    let (idx, val) = top_k_logprobs(&x, classes, k);
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
    let (_, v) = top_k_logprobs(&[0.4, 0.0, -30.0], 3, 2);
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
}
