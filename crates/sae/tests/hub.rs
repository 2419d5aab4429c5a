//! `hf://` specs resolved through hf-hub's cache, without a network: the cache is laid out
//! as hf-hub writes it, and the endpoint points at a closed port so a download fails fast.
//! One test in its own binary, as it sets process environment variables.
use std::path::{Path, PathBuf};

use candle_core::Device;
use cocomix_sae::Sae;

fn eco(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ecosystem")
        .join(name)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn hub_folders_resolve_from_the_cache_and_a_failed_download_says_so() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--someone--gpt2-saes");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let snap = repo.join("snapshots/0123abcd");
    copy_dir(&eco("saelens-topk"), &snap.join("blocks.1.hook_resid_post"));
    copy_dir(&eco("sparsify/layers.1"), &snap.join("layers.1"));
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.pt"),
        snap.join("tiny.pt"),
    )
    .unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");

    let r = candle_core::safetensors::load(eco("reference/saelens-topk.safetensors"), &Device::Cpu)
        .unwrap();
    for spec in [
        "hf://someone/gpt2-saes/blocks.1.hook_resid_post",
        "hf://someone/gpt2-saes/blocks.1.hook_resid_post/",
        "hf://someone/gpt2-saes/blocks.1.hook_resid_post/cfg.json",
    ] {
        let sae = Sae::load(spec, &Device::Cpu).unwrap();
        let z = sae.dense(&sae.encode(&r["x"]).unwrap()).unwrap();
        let diff: f32 = (z - &r["z"])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{spec}: {diff}");
        assert!(sae.files()[0].starts_with(&snap), "{:?}", sae.files());
    }
    let sae = Sae::load("hf://someone/gpt2-saes/layers.1", &Device::Cpu).unwrap();
    assert_eq!(sae.activation().to_string(), "TopK (k = 6)");
    let sae = Sae::load("hf://someone/gpt2-saes/tiny.pt", &Device::Cpu).unwrap();
    assert_eq!(sae.d_model(), 6);

    let e = Sae::load(
        "hf://someone/gpt2-saes/blocks.9.hook_resid_post",
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("hf://someone/gpt2-saes/blocks.9.hook_resid_post")
            && e.contains("could not download")
            && e.contains("local path"),
        "{e}"
    );
    let e = Sae::load("hf://someone", &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("expected hf://owner/repo"), "{e}");
}
