use std::io::Write;
use std::path::{Path, PathBuf};

use cocomix_data::{prepare, Dataset, PrepareOptions, TokenDtype, Tokenizer};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn corpus(dir: &Path) -> PathBuf {
    let c = dir.join("corpus");
    for i in 0..20 {
        write(
            &c.join(format!("doc{i:02}.txt")),
            format!("Document number {i}. The quick brown fox jumps over the lazy dog.").as_bytes(),
        );
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"{\"text\": \"json one\"}\n\n{\"text\": \"json two\", \"id\": 3}\n")
        .unwrap();
    write(&c.join("sub/more.jsonl.gz"), &gz.finish().unwrap());
    write(&c.join("ignored.bin"), b"\x00\x01");
    c
}

fn opts(inputs: Vec<PathBuf>, out: PathBuf) -> PrepareOptions {
    PrepareOptions {
        val_fraction: 0.2,
        seed: 7,
        ..PrepareOptions::new(inputs, out)
    }
}

#[test]
fn prepares_shards_that_decode_to_the_documents() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path());
    let tok = Tokenizer::gpt2().unwrap();
    let out = dir.path().join("data");
    let meta = prepare(&opts(vec![c], out.clone()), &tok).unwrap();
    assert_eq!(meta.dtype, TokenDtype::U16);
    assert_eq!(meta.train_documents + meta.val_documents, 22);
    assert_eq!(meta.val_documents, 4); // round(22 * 0.2)
    assert_eq!(meta.sources.len(), 21);
    let data = Dataset::open(&out).unwrap();
    data.check_tokenizer(&tok).unwrap();
    assert_eq!(
        std::fs::metadata(out.join("train.bin")).unwrap().len(),
        meta.train_tokens * 2
    );
    let all = data.train.window(0, data.train.len());
    let eots = all.iter().filter(|&&t| t == 50256).count() as u64;
    assert_eq!(eots, meta.train_documents);
    let text = tok.decode(&all).unwrap();
    assert!(text.contains("The quick brown fox jumps over the lazy dog.<|endoftext|>"));
    // The saved tokenizer is the run's tokenizer.
    assert_eq!(data.tokenizer().unwrap().identity(), tok.identity());
}

#[test]
fn split_is_deterministic_and_seeded_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path());
    let tok = Tokenizer::gpt2().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    prepare(&opts(vec![c.clone()], a.clone()), &tok).unwrap();
    prepare(&opts(vec![c.clone()], b.clone()), &tok).unwrap();
    assert_eq!(
        std::fs::read(a.join("val.bin")).unwrap(),
        std::fs::read(b.join("val.bin")).unwrap()
    );
    assert_eq!(
        std::fs::read(a.join("train.bin")).unwrap(),
        std::fs::read(b.join("train.bin")).unwrap()
    );
    let other = dir.path().join("other");
    let mut o = opts(vec![c.clone()], other.clone());
    o.seed = 8;
    prepare(&o, &tok).unwrap();
    assert_ne!(
        std::fs::read(a.join("val.bin")).unwrap(),
        std::fs::read(other.join("val.bin")).unwrap()
    );
    // Re-running reuses: the shard is not rewritten.
    let before = std::fs::metadata(a.join("train.bin"))
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    prepare(&opts(vec![c.clone()], a.clone()), &tok).unwrap();
    assert_eq!(
        before,
        std::fs::metadata(a.join("train.bin"))
            .unwrap()
            .modified()
            .unwrap()
    );
    // A changed source is noticed.
    write(&c.join("doc00.txt"), b"changed text");
    prepare(&opts(vec![c], a.clone()), &tok).unwrap();
    assert_ne!(
        before,
        std::fs::metadata(a.join("train.bin"))
            .unwrap()
            .modified()
            .unwrap()
    );
}

#[test]
fn batches_are_seeded_windows_and_val_blocks_cover_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path());
    let tok = Tokenizer::gpt2().unwrap();
    let out = dir.path().join("data");
    prepare(&opts(vec![c], out.clone()), &tok).unwrap();
    let data = Dataset::open(&out).unwrap();
    let b1 = data.train_batch(3, 8, 22, 5).unwrap();
    assert_eq!(b1.len(), 3 * 9);
    assert_eq!(b1, data.train_batch(3, 8, 22, 5).unwrap());
    assert_ne!(b1, data.train_batch(3, 8, 22, 6).unwrap());
    assert_ne!(b1, data.train_batch(3, 8, 23, 5).unwrap());
    let all = data.train.window(0, data.train.len());
    for row in b1.chunks(9) {
        assert!(
            all.windows(9).any(|w| w == row),
            "each row is a contiguous window"
        );
    }
    let starts = data.val_block_starts(4);
    let n = data.val.len();
    assert_eq!(starts.len(), (n - 1) / 4);
    assert!(starts.windows(2).all(|w| w[1] - w[0] == 4));
    assert!(starts.last().unwrap() + 5 <= n);
}

#[test]
fn u32_shards_for_wide_vocabularies() {
    assert_eq!(TokenDtype::for_vocab(65536), TokenDtype::U16);
    assert_eq!(TokenDtype::for_vocab(65537), TokenDtype::U32);
}

#[test]
fn bad_inputs_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::gpt2().unwrap();
    let out = dir.path().join("out");
    let err = |inputs: Vec<PathBuf>| {
        prepare(&opts(inputs, out.clone()), &tok)
            .err()
            .unwrap()
            .to_string()
    };

    let missing = dir.path().join("missing.txt");
    assert!(err(vec![missing.clone()]).contains("missing.txt"));

    let empty = dir.path().join("empty.txt");
    write(&empty, b"  \n");
    assert!(err(vec![empty]).contains("empty"));

    let bad_jsonl = dir.path().join("bad.jsonl");
    write(&bad_jsonl, b"{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n");
    let e = err(vec![bad_jsonl]);
    assert!(
        e.contains("bad.jsonl") && e.contains("line 2") && e.contains("text"),
        "{e}"
    );

    let bad_gz = dir.path().join("bad.txt.gz");
    write(&bad_gz, b"not gzip at all");
    assert!(err(vec![bad_gz]).contains("bad.txt.gz"));

    let unknown = dir.path().join("x.csv");
    write(&unknown, b"a,b");
    assert!(err(vec![unknown]).contains("x.csv"));
}

#[test]
fn invalid_utf8_is_replaced_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::gpt2().unwrap();
    write(
        &dir.path().join("c/a.txt"),
        b"good text \xff\xfe more \xc3 text",
    );
    write(&dir.path().join("c/b.txt"), b"second document");
    let meta = prepare(
        &opts(vec![dir.path().join("c")], dir.path().join("o")),
        &tok,
    )
    .unwrap();
    // \xff and \xfe are two invalid sequences, \xc3 (cut short) a third: one U+FFFD each.
    assert_eq!(meta.replaced_invalid_utf8, 3);
}

#[test]
fn truncated_shard_and_foreign_tokenizer_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path());
    let tok = Tokenizer::gpt2().unwrap();
    let out = dir.path().join("data");
    prepare(&opts(vec![c], out.clone()), &tok).unwrap();
    let small = Tokenizer::train_bpe(["the cat sat on the mat ".repeat(20)].iter(), 270).unwrap();
    let e = Dataset::open(&out)
        .unwrap()
        .check_tokenizer(&small)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("meta.json") && e.contains("tokenizer"), "{e}");
    let train = out.join("train.bin");
    let bytes = std::fs::read(&train).unwrap();
    std::fs::write(&train, &bytes[..bytes.len() - 3]).unwrap();
    let e = Dataset::open(&out).err().unwrap().to_string();
    assert!(e.contains("train.bin") && e.contains("truncated"), "{e}");
    std::fs::write(out.join("meta.json"), "{").unwrap();
    assert!(Dataset::open(&out)
        .err()
        .unwrap()
        .to_string()
        .contains("meta.json"));
}

/// A shard past 4 GiB is read at the right offsets (a sparse file: nothing is written but
/// the last tokens).
#[test]
fn shards_past_four_gib_are_read_at_64_bit_offsets() {
    use std::io::{Seek, SeekFrom};
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::gpt2().unwrap();
    let out = dir.path().join("data");
    // A real preparation gives a valid meta.json and val.bin; train.bin is replaced.
    let c = corpus(dir.path());
    let mut meta = prepare(&opts(vec![c], out.clone()), &tok).unwrap();
    let n = (9u64 << 30) / 2 + 4; // 9 GiB + 8 bytes of u16 tokens
    let f = std::fs::File::create(out.join("train.bin")).unwrap();
    f.set_len(n * 2).unwrap();
    let mut f = f;
    f.seek(SeekFrom::Start(n * 2 - 8)).unwrap();
    f.write_all(&[1, 0, 2, 0, 0xff, 0xff, 0x50, 0xc4]).unwrap();
    drop(f);
    meta.train_tokens = n;
    std::fs::write(out.join("meta.json"), serde_json::to_string(&meta).unwrap()).unwrap();
    let data = Dataset::open(&out).unwrap();
    assert_eq!(data.train.len() as u64, n);
    assert_eq!(
        data.train.window(data.train.len() - 4, 4),
        [1, 2, 65535, 50256]
    );
    assert_eq!(data.train.window((1 << 31) + 7, 2), [0, 0]);
    let batch = data.train_batch(4, 16, 1, 0).unwrap();
    assert_eq!(batch.len(), 4 * 17);
}
