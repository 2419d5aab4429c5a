//! Corpus formats against each other: the fixtures (written by pyarrow and python-zstandard,
//! see scripts/make-data-fixtures.py) hold the same documents as `docs.jsonl`.
use std::io::Write;
use std::path::{Path, PathBuf};

use cocomix_data::{prepare, DataMeta, Dataset, PrepareOptions, Tokenizer};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn opts(inputs: Vec<PathBuf>, out: &Path, field: &str) -> PrepareOptions {
    PrepareOptions {
        val_fraction: 0.3,
        seed: 11,
        field: field.into(),
        ..PrepareOptions::new(inputs, out.to_path_buf())
    }
}

/// Prepares `inputs` into a fresh folder; returns the meta and both shards' bytes.
fn prepared(inputs: Vec<PathBuf>, field: &str) -> (DataMeta, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let meta = prepare(&opts(inputs, &out, field), &Tokenizer::gpt2().unwrap()).unwrap();
    let train = std::fs::read(out.join("train.bin")).unwrap();
    let val = std::fs::read(out.join("val.bin")).unwrap();
    (meta, train, val)
}

fn error(inputs: Vec<PathBuf>, field: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    prepare(
        &opts(inputs, &dir.path().join("data"), field),
        &Tokenizer::gpt2().unwrap(),
    )
    .expect_err("bad input must be refused")
    .to_string()
}

/// The texts of `docs.jsonl` read by serde_json directly, null and blank ones left out.
fn expected_texts() -> Vec<String> {
    std::fs::read_to_string(fixture("docs.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["text"].as_str().map(str::to_string)
        })
        .filter(|t| !t.trim().is_empty())
        .collect()
}

#[test]
fn jsonl_shards_hold_each_document_once_with_ordinary_tokens() {
    let tok = Tokenizer::gpt2().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let meta = prepare(&opts(vec![fixture("docs.jsonl")], &out, "text"), &tok).unwrap();
    let texts = expected_texts();
    assert_eq!(texts.len(), 7);
    assert_eq!(meta.train_documents + meta.val_documents, 7);
    assert_eq!(meta.val_documents, 2); // round(7 * 0.3)
    assert_eq!(meta.skipped_empty_documents, 3); // null, "" and whitespace
    assert_eq!(meta.field, "text");
    assert_eq!(meta.resumed_from, None);
    let data = Dataset::open(&out).unwrap();
    let mut docs: Vec<Vec<u32>> = Vec::new();
    for shard in [&data.train, &data.val] {
        let ids = shard.window(0, shard.len());
        assert_eq!(ids.last(), Some(&tok.eot_id()));
        docs.extend(
            ids.split(|&t| t == tok.eot_id())
                .filter(|d| !d.is_empty())
                .map(<[u32]>::to_vec),
        );
    }
    // Each document is its ordinary encoding (a literal <|endoftext|> stays text).
    let mut want: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode_ordinary(t).unwrap())
        .collect();
    docs.sort();
    want.sort();
    assert_eq!(docs, want);
}

#[test]
fn parquet_and_zstd_jsonl_give_the_tokens_of_the_equivalent_jsonl() {
    let (jmeta, jtrain, jval) = prepared(vec![fixture("docs.jsonl")], "text");
    // snappy + dictionary pages, gzip, zstd + large_string; several row groups and pages;
    // zstd JSONL in two frames.
    for name in [
        "docs.snappy.parquet",
        "docs.gzip.parquet",
        "docs.zstd.parquet",
        "docs.jsonl.zst",
    ] {
        let (meta, train, val) = prepared(vec![fixture(name)], "text");
        assert_eq!(train, jtrain, "{name}: train.bin");
        assert_eq!(val, jval, "{name}: val.bin");
        assert_eq!(meta.skipped_empty_documents, jmeta.skipped_empty_documents);
        assert_eq!(meta.train_tokens, jmeta.train_tokens);
    }
}

#[test]
fn binary_column_with_invalid_utf8_matches_jsonl_with_the_same_bytes() {
    let (pmeta, ptrain, pval) = prepared(vec![fixture("raw.parquet")], "raw");
    let (jmeta, jtrain, jval) = prepared(vec![fixture("raw.jsonl")], "raw");
    assert_eq!((ptrain, pval), (jtrain.clone(), jval.clone()));
    // \xe9, \xff, \xfe and the cut-short \xe2\x82: four U+FFFD.
    assert_eq!(pmeta.replaced_invalid_utf8, 4);
    assert_eq!(jmeta.replaced_invalid_utf8, 4);
    assert_eq!(pmeta.skipped_empty_documents, 1); // the null row
    assert_eq!(pmeta.train_documents + pmeta.val_documents, 5);
    let tok = Tokenizer::gpt2().unwrap();
    let ids: Vec<u32> = [jtrain, jval]
        .concat()
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
        .collect();
    let text = tok.decode(&ids).unwrap();
    for doc in [
        "caf\u{fffd} au lait",
        "valid bytes only",
        "\u{fffd}\u{fffd} leading garbage",
        "cut short \u{fffd}",
    ] {
        assert!(text.contains(doc), "{text:?} lacks {doc:?}");
    }
}

#[test]
fn another_column_is_picked_with_field() {
    let (meta, train, _) = prepared(vec![fixture("docs.snappy.parquet")], "url");
    assert_eq!(meta.train_documents + meta.val_documents, 10);
    assert_eq!(meta.skipped_empty_documents, 0);
    let ids: Vec<u32> = train
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
        .collect();
    assert!(Tokenizer::gpt2()
        .unwrap()
        .decode(&ids)
        .unwrap()
        .contains("https://example.org/"));
}

#[test]
fn zstd_round_trip_of_jsonl_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let plain = std::fs::read(fixture("docs.jsonl")).unwrap();
    let zst = dir.path().join("rust.jsonl.zst");
    std::fs::write(&zst, zstd::encode_all(&plain[..], 9).unwrap()).unwrap();
    let (_, a, av) = prepared(vec![fixture("docs.jsonl")], "text");
    let (_, b, bv) = prepared(vec![zst], "text");
    assert_eq!((a, av), (b, bv));

    let txt = dir.path().join("t/a.txt");
    let txt_zst = dir.path().join("z/a.txt.zst");
    std::fs::create_dir_all(txt.parent().unwrap()).unwrap();
    std::fs::create_dir_all(txt_zst.parent().unwrap()).unwrap();
    let body = "A text file compressed with zstd is one document.\n".repeat(50);
    std::fs::write(&txt, &body).unwrap();
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    enc.write_all(body.as_bytes()).unwrap();
    std::fs::write(&txt_zst, enc.finish().unwrap()).unwrap();
    let second = dir.path().join("t/b.txt");
    std::fs::write(&second, "second").unwrap();
    let (_, a, _) = prepared(vec![txt, second.clone()], "text");
    let (_, b, _) = prepared(vec![txt_zst, second], "text");
    assert_eq!(a, b);
}

#[test]
fn bad_parquet_and_zstd_files_get_clear_errors() {
    let cases: [(&str, &str, &[&str]); 7] = [
        (
            "bad-no-text.parquet",
            "text",
            &["no column \"text\"", "id, content", "--field"],
        ),
        (
            "bad-int-text.parquet",
            "text",
            &["column \"text\"", "INT64", "not text"],
        ),
        ("bad-list-text.parquet", "text", &["list or struct"]),
        (
            "bad-truncated.parquet",
            "text",
            &["not a readable Parquet file"],
        ),
        (
            "bad-brotli.parquet",
            "text",
            &["row group 0", "brotli", "snappy, zstd or gzip"],
        ),
        ("bad-corrupt.jsonl.zst", "text", &["zstd stream"]),
        (
            "docs.jsonl",
            "body",
            &["line 1", "no field \"body\"", "id, text"],
        ),
    ];
    for (name, field, needles) in cases {
        let e = error(vec![fixture(name)], field);
        assert!(e.contains(name), "{name}: {e}");
        for n in needles {
            assert!(e.contains(n), "{name}: {e:?} lacks {n:?}");
        }
    }
    // A bad file late in the corpus is found by the counting pass, before any shard.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let e = prepare(
        &opts(
            vec![fixture("docs.jsonl"), fixture("bad-no-text.parquet")],
            &out,
            "text",
        ),
        &Tokenizer::gpt2().unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("bad-no-text.parquet"));
    assert!(!out.join("train.bin.tmp").exists());
}

#[test]
fn globs_expand_in_name_order_and_an_empty_glob_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    std::fs::create_dir_all(c.join("sub")).unwrap();
    std::fs::copy(fixture("docs.jsonl"), c.join("b.jsonl")).unwrap();
    std::fs::copy(fixture("docs.snappy.parquet"), c.join("a.parquet")).unwrap();
    std::fs::copy(fixture("docs.zstd.parquet"), c.join("sub/c.parquet")).unwrap();
    std::fs::write(c.join("notes.csv"), "x").unwrap();

    let top = prepared(vec![c.join("*.parquet")], "text").0;
    assert_eq!(top.sources.len(), 1);
    assert!(top.sources[0].path.ends_with("a.parquet"));
    let deep = prepared(vec![c.join("**/*.parquet")], "text").0;
    let names: Vec<&str> = deep.sources.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].ends_with("a.parquet") && names[1].ends_with("sub/c.parquet"));
    // Mixed formats in one glob, in name order.
    let mixed = prepared(vec![c.join("[ab].*")], "text").0;
    assert_eq!(mixed.sources.len(), 2);
    assert!(mixed.sources[0].path.ends_with("a.parquet"));

    let pattern = c.join("*.jsonl.zst");
    let e = error(vec![pattern.clone()], "text");
    assert!(
        e.contains(&*pattern.to_string_lossy()) && e.contains("matches no file"),
        "{e}"
    );
    let e = error(vec![c.join("*.csv")], "text");
    assert!(
        e.contains("notes.csv") && e.contains("unknown file type"),
        "{e}"
    );
    let e = error(vec![c.join("b.jsonl"), c.join("*.jsonl")], "text");
    assert!(e.contains("b.jsonl") && e.contains("named twice"), "{e}");
    let e = error(vec![c.join("[")], "text");
    assert!(e.contains("glob pattern"), "{e}");
}
