use cocomix_data::Tokenizer;

#[test]
fn gpt2_pinned_ids() {
    let tok = Tokenizer::gpt2().unwrap();
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.eot_id(), 50256);
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(
        tok.encode("Hello world<|endoftext|> The quick brown fox")
            .unwrap(),
        vec![15496, 995, 50256, 383, 2068, 7586, 21831]
    );
}

#[test]
fn encode_ordinary_keeps_eot_text_as_text() {
    let tok = Tokenizer::gpt2().unwrap();
    let ids = tok.encode_ordinary("a<|endoftext|>b").unwrap();
    assert!(!ids.contains(&50256));
    assert_eq!(tok.decode(&ids).unwrap(), "a<|endoftext|>b");
}

#[test]
fn gpt2_round_trips_multilingual_and_emoji() {
    let tok = Tokenizer::gpt2().unwrap();
    for s in [
        "Hello world",
        "  leading spaces and\ttabs\n\nnewlines  ",
        "Grüße aus München, ça va? Ñandú",
        "日本語のテキストと中文",
        "Привет, мир! Γειά σου κόσμε",
        "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
        "mixed<|endoftext|>special",
    ] {
        let ids = tok.encode(s).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), s, "round trip of {s:?}");
    }
}

#[test]
fn vocab_merges_files_and_saved_json_agree_with_bundled() {
    let dir = tempfile::tempdir().unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/gpt2");
    let from_files = Tokenizer::from_vocab_merges(
        &std::path::Path::new(root).join("vocab.json"),
        &std::path::Path::new(root).join("merges.txt"),
    )
    .unwrap();
    let bundled = Tokenizer::gpt2().unwrap();
    assert_eq!(from_files.identity(), bundled.identity());
    bundled.save(dir.path()).unwrap();
    let reloaded = Tokenizer::load(dir.path().join("tokenizer.json").to_str().unwrap()).unwrap();
    let s = "The quick brown fox<|endoftext|> jumps";
    assert_eq!(reloaded.encode(s).unwrap(), bundled.encode(s).unwrap());
    assert_eq!(reloaded.identity(), bundled.identity());
}

#[test]
fn trains_a_small_bpe() {
    let text = "the cat sat on the mat. the dog sat on the log. ".repeat(50);
    let tok = Tokenizer::train_bpe([text.as_str()].into_iter(), 300).unwrap();
    assert!(tok.vocab_size() <= 300 && tok.vocab_size() > 257);
    let ids = tok.encode("the cat sat").unwrap();
    assert!(ids.len() < "the cat sat".len(), "merges learned: {ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), "the cat sat");
    assert_eq!(tok.decode(&[tok.eot_id()]).unwrap(), "<|endoftext|>");
    assert!(Tokenizer::train_bpe(["x"].into_iter(), 100).is_err());
}

#[test]
fn bad_paths_are_named() {
    let err = Tokenizer::load("/no/such/tokenizer.json")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/no/such/tokenizer.json"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    std::fs::write(&p, "{not json").unwrap();
    let err = Tokenizer::load(p.to_str().unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not a tokenizer.json"),
        "{err}"
    );
}
