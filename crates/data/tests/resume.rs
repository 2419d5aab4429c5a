//! An interrupted preparation continues after its last finished file and ends with the bytes
//! of an uninterrupted one: stopped by the documented hook, and killed with SIGKILL.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocomix_data::{prepare, DataMeta, Error, PrepareOptions, Tokenizer, PROGRESS_FILE};

const WORDS: &[&str] = &[
    "the",
    "model",
    "reads",
    "concepts",
    "from",
    "a",
    "sparse",
    "autoencoder",
    "and",
    "mixes",
    "them",
    "into",
    "its",
    "hidden",
    "state",
    "while",
    "predicting",
    "next",
    "token",
    "of",
    "text",
    "corpus",
    "river",
    "mountain",
    "seventeen",
    "quickly",
    "blue",
    "under",
    "over",
    "window",
    "history",
    "because",
    "although",
    "Paris",
    "1984",
    "—",
    "naïve",
    "café",
];

/// `files` JSONL files of `docs` documents each, deterministic pseudo-random prose.
fn corpus(dir: &Path, files: usize, docs: usize, words: usize) -> PathBuf {
    let c = dir.join("corpus");
    std::fs::create_dir_all(&c).unwrap();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for f in 0..files {
        let mut out = String::new();
        for _ in 0..docs {
            let mut doc = String::new();
            for w in 0..words {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                doc.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
                doc.push(if w % 17 == 16 { '.' } else { ' ' });
            }
            out.push_str(&serde_json::json!({ "text": doc }).to_string());
            out.push('\n');
        }
        std::fs::write(c.join(format!("part-{f:03}.jsonl")), out).unwrap();
    }
    c
}

fn opts(corpus: &Path, out: &Path) -> PrepareOptions {
    PrepareOptions {
        val_fraction: 0.1,
        seed: 3,
        ..PrepareOptions::new(vec![corpus.to_path_buf()], out.to_path_buf())
    }
}

fn shards(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join("train.bin")).unwrap(),
        std::fs::read(dir.join("val.bin")).unwrap(),
    )
}

fn stop_after(corpus: &Path, out: &Path, n: usize, tok: &Tokenizer) {
    let o = PrepareOptions {
        stop_after_files: Some(n),
        ..opts(corpus, out)
    };
    match prepare(&o, tok) {
        Err(Error::Stopped { done, total, .. }) => assert_eq!((done, total), (n, 6)),
        other => panic!("expected a stop after {n} files, got {other:?}"),
    }
    assert!(out.join(PROGRESS_FILE).exists());
    assert!(!out.join("meta.json").exists() && !out.join("train.bin").exists());
}

#[test]
fn a_stopped_preparation_continues_from_its_last_finished_file() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path(), 6, 5, 60);
    let tok = Tokenizer::gpt2().unwrap();
    let whole = dir.path().join("whole");
    let whole_meta = prepare(&opts(&c, &whole), &tok).unwrap();
    assert_eq!(whole_meta.resumed_from, None);

    // Stopped twice, then finished: the same bytes, and it says where it resumed.
    let out = dir.path().join("out");
    stop_after(&c, &out, 2, &tok);
    stop_after(&c, &out, 4, &tok);
    let meta = prepare(&opts(&c, &out), &tok).unwrap();
    assert_eq!(meta.resumed_from, Some(4));
    assert_eq!(shards(&out), shards(&whole));
    assert_eq!(
        DataMeta {
            resumed_from: None,
            sources: whole_meta.sources.clone(),
            ..meta
        },
        whole_meta
    );
    assert!(!out.join(PROGRESS_FILE).exists());

    // Bytes written after the checkpoint (a kill mid-file) are cut away.
    let out = dir.path().join("junk");
    stop_after(&c, &out, 3, &tok);
    let tmp = out.join("train.bin.tmp");
    let mut bytes = std::fs::read(&tmp).unwrap();
    bytes.extend_from_slice(&[0xAB; 1001]);
    std::fs::write(&tmp, bytes).unwrap();
    assert_eq!(
        prepare(&opts(&c, &out), &tok).unwrap().resumed_from,
        Some(3)
    );
    assert_eq!(shards(&out), shards(&whole));

    // Resumed, not restarted: finished parts are not rewritten (a marker planted in the
    // first file's tokens survives).
    let out = dir.path().join("marked");
    stop_after(&c, &out, 2, &tok);
    let tmp = out.join("train.bin.tmp");
    let mut bytes = std::fs::read(&tmp).unwrap();
    bytes[..4].copy_from_slice(&[0xEE; 4]);
    std::fs::write(&tmp, bytes).unwrap();
    prepare(&opts(&c, &out), &tok).unwrap();
    let (train, _) = shards(&out);
    assert_eq!(train[..4], [0xEE; 4]);
    assert_eq!(train[4..], shards(&whole).0[4..]);

    // A checkpoint of another corpus is not resumed.
    let out = dir.path().join("changed");
    stop_after(&c, &out, 2, &tok);
    std::fs::write(c.join("part-000.jsonl"), "{\"text\": \"replaced\"}\n").unwrap();
    let meta = prepare(&opts(&c, &out), &tok).unwrap();
    assert_eq!(meta.resumed_from, None);
    let fresh = dir.path().join("fresh");
    prepare(&opts(&c, &fresh), &tok).unwrap();
    assert_eq!(shards(&out), shards(&fresh));
}

const CHILD: &str = "COCOMIX_TEST_PREPARE_CHILD";

fn files_done(out: &Path) -> usize {
    std::fs::read_to_string(out.join(PROGRESS_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["files_done"].as_u64())
        .unwrap_or(0) as usize
}

#[test]
fn a_sigkilled_preparation_resumes_to_identical_shards() {
    // The child: this same test, re-run by the parent below, preparing until it is killed.
    if let Ok(dirs) = std::env::var(CHILD) {
        let (c, out) = dirs.split_once('\n').unwrap();
        prepare(
            &opts(Path::new(c), Path::new(out)),
            &Tokenizer::gpt2().unwrap(),
        )
        .unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = 60;
    let c = corpus(dir.path(), files, 8, 400);
    let out = dir.path().join("killed");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "a_sigkilled_preparation_resumes_to_identical_shards",
            "--exact",
            "--test-threads=1",
        ])
        .env(CHILD, format!("{}\n{}", c.display(), out.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while files_done(&out) < 3 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child ended before it was killed"
        );
        assert!(t0.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child finished before it was killed: make the corpus larger"
    );
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    #[cfg(unix)]
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    #[cfg(not(unix))]
    assert!(!status.success());
    let killed_at = files_done(&out);
    assert!((3..files).contains(&killed_at), "{killed_at}");
    assert!(!out.join("meta.json").exists());

    let tok = Tokenizer::gpt2().unwrap();
    let meta = prepare(&opts(&c, &out), &tok).unwrap();
    assert_eq!(meta.resumed_from, Some(killed_at));
    let whole = dir.path().join("whole");
    prepare(&opts(&c, &whole), &tok).unwrap();
    assert_eq!(shards(&out), shards(&whole));
}
