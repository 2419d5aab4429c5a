//! Perplexity, word perplexity and bits per byte against lm-evaluation-harness's rolling
//! windows, written out independently here.
use candle_core::{Device, Tensor};
use cocomix_data::Tokenizer;
use cocomix_eval::{count_words, perplexity, score_text, score_text_file};
use cocomix_model::{AnyModel, Gpt2, Gpt2Config, Params};

fn model() -> AnyModel {
    let cfg = Gpt2Config::new(50257, 16, 8, 1, 2).with_dropout(0.0);
    AnyModel::Gpt2(Gpt2::new(&cfg, &mut Params::random(7, &Device::Cpu, false)).unwrap())
}

/// lm-eval's `get_rolling_token_windows(token_list, prefix_token, max_seq_len,
/// context_len=1)`, transcribed: (input, predicted) pairs.
fn rolling_windows(tokens: &[u32], prefix: u32, max_len: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut out = Vec::new();
    let first = max_len.min(tokens.len());
    let mut input = vec![prefix];
    input.extend_from_slice(&tokens[..first - 1]);
    out.push((input, tokens[..first].to_vec()));
    let mut predicted = first;
    while predicted < tokens.len() {
        let n = (tokens.len() - predicted).min(max_len);
        let end = predicted + n;
        out.push((
            tokens[end - max_len - 1..end - 1].to_vec(),
            tokens[end - n..end].to_vec(),
        ));
        predicted += n;
    }
    out
}

/// Σ log p(predicted | input) of one window, the predicted tokens being the input's last
/// positions shifted by one (f64 log-softmax of the model's logits).
fn window_ll(m: &AnyModel, input: &[u32], predicted: &[u32]) -> f64 {
    let x = Tensor::new(input, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<Vec<f32>> = m.logits(&x).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let start = input.len() - predicted.len();
    predicted
        .iter()
        .enumerate()
        .map(|(j, &t)| {
            let row = &logits[start + j];
            let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = mx + row.iter().map(|&z| (z as f64 - mx).exp()).sum::<f64>().ln();
            row[t as usize] as f64 - lse
        })
        .sum()
}

#[test]
fn words_are_counted_as_re_split_on_whitespace_runs() {
    assert_eq!(count_words("a b  c"), 3); // ["a", "b", "c"]
    assert_eq!(count_words(" a b"), 3); // ["", "a", "b"]
    assert_eq!(count_words("a\n\tb\n"), 3); // ["a", "b", ""]
    assert_eq!(count_words("naïve café"), 2);
    assert_eq!(count_words(""), 1); // re.split(r"\s+", "") == [""]
}

#[test]
fn text_scores_match_lm_eval_rolling_windows() {
    let (m, tok) = (model(), Tokenizer::gpt2().unwrap());
    let text = "The quick brown fox jumps over the lazy dog. It was not amused, and the café \
                closed early that night because nobody came. Later, the fox went home.";
    let ids = tok.encode(text).unwrap();
    // Three windows of 16, the last one shorter.
    assert!(
        ids.len() > 2 * 16 && ids.len() % 16 != 0,
        "{} tokens",
        ids.len()
    );
    let windows = rolling_windows(&ids, tok.eot_id(), 16);
    let want: f64 = windows.iter().map(|(i, p)| window_ll(&m, i, p)).sum();
    for batch in [1, 3] {
        let s = score_text(&m, &tok, text, 16, batch).unwrap();
        assert_eq!(s.tokens, ids.len(), "every token of the text is predicted");
        let total = s.nll * s.tokens as f64;
        assert!(
            (total + want).abs() < 1e-3 * want.abs(),
            "{total} vs {}",
            -want
        );
        assert_eq!(s.words, 28); // counted by hand
        assert_eq!(s.bytes, text.len());
        assert!((s.word_perplexity - (-want / 28.0).exp()).abs() < 1e-3 * s.word_perplexity);
        let bpb = -want / text.len() as f64 / std::f64::consts::LN_2;
        assert!((s.bits_per_byte - bpb).abs() < 1e-4 * bpb);
    }
}

#[test]
fn the_last_window_reads_a_full_context() {
    // 20 tokens, windows of 8: predictions 1..9, 9..17, 17..20; the last reads tokens 11..19.
    let m = model();
    let ids: Vec<u32> = (0..20).map(|i| (i * 977 + 13) % 50257).collect();
    let p = perplexity(&m, &ids, 8, 2).unwrap();
    assert_eq!(p.tokens, 19);
    let want = window_ll(&m, &ids[0..8], &ids[1..9])
        + window_ll(&m, &ids[8..16], &ids[9..17])
        + window_ll(&m, &ids[11..19], &ids[17..20]);
    assert!((p.total_nll() + want).abs() < 1e-3 * want.abs());
}

#[test]
fn an_empty_text_file_is_an_error_naming_it() {
    let (m, tok) = (model(), Tokenizer::gpt2().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("empty.txt");
    std::fs::write(&f, "").unwrap();
    let err = score_text_file(&m, &tok, &f, 16, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty.txt") && err.contains("need at least two tokens to score"),
        "{err}"
    );
    let err = score_text_file(&m, &tok, &dir.path().join("absent.txt"), 16, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.txt"), "{err}");
}
