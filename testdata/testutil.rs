// Shared test helpers, included by each crate's tests with
// `#[path = "../../../testdata/testutil.rs"] mod testutil;` (no crate depends on another
// for its tests).
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `testdata/golden/`: tiny weights and tensors from an independent PyTorch implementation.
pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden")
}

/// Every tensor of `testdata/golden/expected.safetensors`.
pub fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden_dir().join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// The golden token ids as u32 `[2, 16]`.
pub fn golden_ids(exp: &HashMap<String, Tensor>) -> Tensor {
    exp["input_ids"].to_dtype(DType::U32).unwrap()
}

/// Panics unless `|a − b| ≤ atol + rtol·|b|` elementwise (shapes must match).
pub fn assert_close(a: &Tensor, b: &Tensor, rtol: f32, atol: f32, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let a: Vec<f32> = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > worst.1 || x.is_nan() != y.is_nan() {
            worst = (i, excess.max(f32::MIN_POSITIVE));
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} is {} vs expected {} (excess {})",
        worst.0,
        a[worst.0],
        b[worst.0],
        worst.1
    );
}

/// A scalar of a `[1]` or `[]` tensor.
pub fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}
