//! With the `cuda` feature, compiles `kernels/*.cu` to PTX with nvcc (as candle-kernels
//! does), for `CUDA_COMPUTE_CAP` (default 75, the oldest architecture CUDA 13 targets; the
//! driver JIT-compiles PTX for newer GPUs).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=kernels");
    for var in ["CUDA_COMPUTE_CAP", "NVCC", "NVCC_PREPEND_FLAGS"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for name in ["dropout", "softmax"] {
        let src = format!("kernels/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("--gpu-architecture=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("{nvcc}: cannot run it to compile {src} ({e}); set NVCC"));
        assert!(status.success(), "{nvcc} failed on {src} ({status})");
    }
}
