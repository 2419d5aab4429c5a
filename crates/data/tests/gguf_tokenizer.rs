//! Tokenizers rebuilt from GGUF metadata against transformers' tokenizer of the same files
//! (scripts/make-llama-fixtures.py wrote the files with llama.cpp's gguf-py and the ids with
//! transformers).
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{self, Content, Value};
use cocomix_data::Tokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

#[derive(serde::Deserialize)]
struct Reference {
    samples: Vec<String>,
    ids: HashMap<String, Vec<Vec<u32>>>,
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference.json")).unwrap())
        .unwrap()
}

fn load(kind: &str) -> Tokenizer {
    let path = fixtures().join(format!("tok-{kind}.gguf"));
    Tokenizer::load(path.to_str().unwrap()).unwrap()
}

#[test]
fn ids_equal_transformers_for_each_pre_tokenizer() {
    let r = reference();
    for kind in ["gpt2", "default", "smollm", "llama-bpe"] {
        let tok = load(kind);
        assert_eq!(tok.vocab_size(), 1025, "{kind}: 1024 tokens + <think>");
        for (s, want) in r.samples.iter().zip(&r.ids[kind]) {
            assert_eq!(&tok.encode(s).unwrap(), want, "{kind}: {s:?}");
            assert_eq!(&tok.decode(want).unwrap(), s, "{kind}: decode");
        }
    }
    // The pre-tokenizer kind matters on these samples: a tokenizer that ignored
    // `tokenizer.ggml.pre` could not pass the loop above.
    assert_ne!(r.ids["smollm"], r.ids["gpt2"]);
    assert_ne!(r.ids["llama-bpe"], r.ids["gpt2"]);
    assert_ne!(r.ids["llama-bpe"], r.ids["smollm"]);
}

#[test]
fn special_and_added_tokens() {
    let tok = load("smollm");
    assert_eq!(tok.eot_id(), 0, "<|endoftext|> is the end-of-text token");
    let ids = tok.encode("<|im_start|>hi<|im_end|><think>").unwrap();
    assert_eq!(ids[0], 1);
    assert!(ids.contains(&2));
    assert_eq!(
        *ids.last().unwrap(),
        1024,
        "<think> is user-defined: matched whole"
    );
    let plain = tok.encode_ordinary("<|im_start|>").unwrap();
    assert!(
        !plain.contains(&1),
        "encode_ordinary keeps special tokens as text"
    );
    assert_eq!(tok.decode(&plain).unwrap(), "<|im_start|>");
}

#[test]
fn round_trips_the_bundled_corpus() {
    let corpus =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/corpus/default.jsonl.gz");
    let docs = cocomix_data::read_documents(&[corpus]).unwrap();
    let tok = load("smollm");
    let mut tokens = 0;
    for d in docs.iter().take(60) {
        let ids = tok.encode(d).unwrap();
        tokens += ids.len();
        assert_eq!(&tok.decode(&ids).unwrap(), d);
    }
    assert!(tokens > 100_000, "{tokens}");
}

/// A copy of `tok-gpt2.gguf` with metadata entries replaced, written by Candle's GGUF writer.
fn edited(edits: &[(&str, Option<Value>)]) -> (tempfile::TempDir, PathBuf) {
    let src = fixtures().join("tok-gpt2.gguf");
    let content = Content::read(&mut std::fs::File::open(&src).unwrap()).unwrap();
    let mut md = content.metadata;
    for (k, v) in edits {
        match v {
            Some(v) => md.insert(k.to_string(), v.clone()),
            None => md.remove(*k),
        };
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edited.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md, &[]).unwrap();
    (dir, path)
}

fn load_err(path: &std::path::Path) -> String {
    match Tokenizer::load(path.to_str().unwrap()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_or_broken_tokenizers_are_refused_by_name() {
    let (_d, p) = edited(&[("tokenizer.ggml.pre", Some(Value::String("made-up".into())))]);
    let e = load_err(&p);
    assert!(
        e.contains("edited.gguf") && e.contains("pre-tokenizer `made-up`"),
        "{e}"
    );
    let (_d, p) = edited(&[("tokenizer.ggml.model", Some(Value::String("llama".into())))]);
    let e = load_err(&p);
    assert!(
        e.contains("tokenizer.ggml.model `llama` is not supported"),
        "{e}"
    );
    let (_d, p) = edited(&[("tokenizer.ggml.model", None)]);
    let e = load_err(&p);
    assert!(e.contains("no tokenizer in the metadata"), "{e}");
    let (_d, p) = edited(&[("tokenizer.ggml.merges", None)]);
    let e = load_err(&p);
    assert!(e.contains("`tokenizer.ggml.merges` is missing"), "{e}");
    let (_d, p) = edited(&[(
        "tokenizer.ggml.merges",
        Some(Value::Array(vec![Value::String("a b c".into())])),
    )]);
    let e = load_err(&p);
    assert!(e.contains("tokenizer.ggml.merges[0]"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(fixtures().join("tok-gpt2.gguf")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&cut);
    assert!(
        e.contains("cut.gguf") && e.contains("not a readable GGUF file"),
        "{e}"
    );
}

/// The SmolLM2 GGUF of scripts/fetch-smollm2.sh (absent in CI).
fn smollm2() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} is absent (run scripts/fetch-smollm2.sh)",
            p.display()
        );
        None
    }
}

#[test]
fn smollm2_ids_equal_the_reference_and_round_trip_the_corpus() {
    let Some(path) = smollm2() else { return };
    #[derive(serde::Deserialize)]
    struct Ids {
        gguf_sha256: String,
        text: String,
        ids: Vec<u32>,
    }
    let r: Ids = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2-ids.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cocomix_data::file_sha256(&path).unwrap(), r.gguf_sha256);
    let tok = Tokenizer::load(path.to_str().unwrap()).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eot_id(), 0);
    assert_eq!(tok.encode(&r.text).unwrap(), r.ids);
    let corpus =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/corpus/default.jsonl.gz");
    for d in cocomix_data::read_documents(&[corpus]).unwrap() {
        assert_eq!(tok.decode(&tok.encode(&d).unwrap()).unwrap(), d);
    }
}
