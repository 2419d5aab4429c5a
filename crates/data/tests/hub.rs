//! `hf://datasets/...` inputs without network: the clear error when neither the Hub nor the
//! cache has the files, and the cached snapshot (hf-hub's layout: refs/, snapshots/ of
//! symlinks into blobs/) used when the Hub is unreachable.
//!
//! One test, because it sets process-wide environment variables (HF_HOME, HF_ENDPOINT).
use std::path::{Path, PathBuf};

use cocomix_data::{prepare, PrepareOptions, Tokenizer};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn cache_file(snapshot: &Path, blobs: &Path, repo_path: &str, content: &Path) {
    let bytes = std::fs::read(content).unwrap();
    let etag = cocomix_data::sha256_hex(&bytes);
    std::fs::create_dir_all(blobs).unwrap();
    std::fs::write(blobs.join(&etag), bytes).unwrap();
    let link = snapshot.join(repo_path);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(blobs.join(&etag), &link).unwrap();
    #[cfg(not(unix))]
    std::fs::copy(blobs.join(&etag), &link).unwrap();
}

#[test]
fn hub_inputs_offline_use_the_cache_or_say_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf-home");
    // Nothing listens on port 9 here: the Hub is unreachable, quickly.
    std::env::set_var("HF_HOME", &home);
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_TOKEN");
    let tok = Tokenizer::gpt2().unwrap();
    let run = |spec: &str, out: &str| {
        let o = PrepareOptions {
            val_fraction: 0.2,
            ..PrepareOptions::new(vec![spec.into()], dir.path().join(out))
        };
        prepare(&o, &tok)
    };

    let spec = "hf://datasets/acme/web-corpus/data/*.parquet";
    let e = run(spec, "a").unwrap_err().to_string();
    for needle in [
        spec,
        "could not list datasets/acme/web-corpus@main on the Hugging Face Hub",
        "127.0.0.1:9",
        &home.join("hub").display().to_string(),
        "pass local files",
    ] {
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }
    let e = run("hf://models/gpt2/x.parquet", "b")
        .unwrap_err()
        .to_string();
    assert!(e.contains("hf://datasets/OWNER/NAME"), "{e}");

    // A cached snapshot of the dataset, as hf-hub leaves it.
    let repo = home.join("hub/datasets--acme--web-corpus");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snapshot = repo.join("snapshots").join(commit);
    let blobs = repo.join("blobs");
    cache_file(
        &snapshot,
        &blobs,
        "data/train-00000-of-00002.parquet",
        &fixture("docs.snappy.parquet"),
    );
    cache_file(
        &snapshot,
        &blobs,
        "data/train-00001-of-00002.parquet",
        &fixture("docs.zstd.parquet"),
    );
    cache_file(
        &snapshot,
        &blobs,
        "data/extra/skip.parquet",
        &fixture("raw.parquet"),
    );
    cache_file(&snapshot, &blobs, "README.md", &fixture("docs.jsonl"));

    let meta = run(spec, "cached").unwrap();
    assert_eq!(meta.sources.len(), 2, "{:?}", meta.sources);
    assert!(meta.sources[0]
        .path
        .ends_with("data/train-00000-of-00002.parquet"));
    let local = PrepareOptions {
        val_fraction: 0.2,
        ..PrepareOptions::new(
            vec![fixture("docs.snappy.parquet"), fixture("docs.zstd.parquet")],
            dir.path().join("local"),
        )
    };
    prepare(&local, &tok).unwrap();
    for shard in ["train.bin", "val.bin"] {
        assert_eq!(
            std::fs::read(dir.path().join("cached").join(shard)).unwrap(),
            std::fs::read(dir.path().join("local").join(shard)).unwrap(),
            "{shard}"
        );
    }

    // HF_HUB_OFFLINE skips the Hub; a revision the cache lacks is an error naming it.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let e = run("hf://datasets/acme/web-corpus@v2/data/*.parquet", "c")
        .unwrap_err()
        .to_string();
    assert!(e.contains("@v2") && e.contains("HF_HUB_OFFLINE"), "{e}");
    let e = run("hf://datasets/acme/web-corpus/data/*.jsonl", "d")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no file of it matching \"data/*.jsonl\""), "{e}");
    assert!(run(spec, "offline").is_ok());
}
