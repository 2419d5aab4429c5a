//! The zero-shot tasks against hand-computed scores and lm-evaluation-harness's rules.
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use cocomix_data::Tokenizer;
use cocomix_eval::tasks::{
    encode_pair, evaluate, load_task, require_task_file, Choice, Doc, ModelScorer, Scorer, Task,
};
use cocomix_model::{AnyModel, Gpt2, Gpt2Config, Params};

fn tok() -> Tokenizer {
    Tokenizer::gpt2().unwrap()
}

/// Log-likelihoods set by hand, keyed by the decoded (context, continuation).
struct Hand {
    tok: Tokenizer,
    ll: HashMap<(String, String), (f64, bool)>,
}

impl Scorer for Hand {
    fn score(&self, group: &[(Vec<u32>, Vec<u32>)]) -> cocomix_eval::Result<Vec<(f64, bool)>> {
        Ok(group
            .iter()
            .map(|(c, k)| {
                let key = (self.tok.decode(c).unwrap(), self.tok.decode(k).unwrap());
                *self
                    .ll
                    .get(&key)
                    .unwrap_or_else(|| panic!("no hand value for {key:?}"))
            })
            .collect())
    }
}

fn doc(ctx: &str, conts: &[&str], gold: usize) -> Doc {
    Doc {
        choices: conts.iter().map(|c| Choice::new(ctx, *c)).collect(),
        gold,
    }
}

#[test]
fn acc_and_acc_norm_disagree_exactly_as_computed_by_hand() {
    let task = Task {
        name: "hellaswag".into(),
        docs: vec![
            doc("Q1", &[" a", " bbbbbbbb"], 1),
            doc("Q2", &[" yes", " no"], 0),
        ],
    };
    let ll = HashMap::from([
        (("Q1".into(), " a".into()), (-2.0, false)),
        (("Q1".into(), " bbbbbbbb".into()), (-3.0, false)),
        (("Q2".into(), " yes".into()), (-1.0, false)),
        (("Q2".into(), " no".into()), (-4.0, false)),
    ]);
    let r = evaluate(&task, &tok(), &Hand { tok: tok(), ll }, None).unwrap();
    // Doc 1: raw ll picks " a" (wrong); per character of the choice text, −2/1 = −2 <
    // −3/8 = −0.375: picks the gold one. (The earlier byte rule, with the space, gave −2/2
    // and −3/9: the same choice, so the numbers stand.)
    assert_eq!(r.metrics["acc"].value, 0.5);
    assert_eq!(r.metrics["acc_norm"].value, 1.0);
    // Sample std of {0, 1} is √0.5; stderr = √(0.5/2) = 0.5.
    assert!((r.metrics["acc"].stderr - 0.5).abs() < 1e-12);
    assert_eq!(r.metrics["acc_norm"].stderr, 0.0);
    assert_eq!(r.samples, 2);
    let limited = evaluate(
        &task,
        &tok(),
        &Hand {
            tok: tok(),
            ll: HashMap::from([
                (("Q1".into(), " a".into()), (-2.0, false)),
                (("Q1".into(), " bbbbbbbb".into()), (-3.0, false)),
            ]),
        },
        Some(1),
    )
    .unwrap();
    assert_eq!(limited.samples, 1);
}

/// Evaluates one HellaSwag-scored document with hand-set log-likelihoods, keyed by the
/// continuation (the context is "Q"); returns (acc, acc_norm).
fn acc_and_norm(choices: &[(&str, f64)], gold: usize) -> (f64, f64) {
    let conts: Vec<&str> = choices.iter().map(|c| c.0).collect();
    let task = Task {
        name: "hellaswag".into(),
        docs: vec![doc("Q", &conts, gold)],
    };
    let ll = choices
        .iter()
        .map(|(c, l)| (("Q".to_string(), c.to_string()), (*l, false)))
        .collect();
    let r = evaluate(&task, &tok(), &Hand { tok: tok(), ll }, None).unwrap();
    (r.metrics["acc"].value, r.metrics["acc_norm"].value)
}

#[test]
fn acc_norm_leaves_the_leading_space_out_of_the_length() {
    // Choice texts "a" (1 char) and "bb" (2 chars); lls −1.0 and −1.8.
    // Without the space: −1.0/1 = −1.0 < −1.8/2 = −0.9, so acc_norm picks "bb" (gold).
    // Counting the space (2 and 3) would give −0.5 > −0.6 and pick "a".
    // Raw lls pick "a": acc 0.
    assert_eq!(acc_and_norm(&[(" a", -1.0), (" bb", -1.8)], 1), (0.0, 1.0));
}

#[test]
fn acc_norm_counts_characters_not_bytes() {
    // "é" is 1 character but 2 UTF-8 bytes; "ab" is 2 and 2. lls −1.5 and −2.5.
    // Characters: −1.5/1 = −1.5 < −2.5/2 = −1.25: picks "ab" (gold).
    // Bytes would give −1.5/2 = −0.75 > −1.25 and pick "é". Raw lls pick "é": acc 0.
    assert_eq!(acc_and_norm(&[(" é", -1.5), (" ab", -2.5)], 1), (0.0, 1.0));
    // A request file's doc.choices text is what counts, not the continuation.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("piqa.jsonl");
    let line = |idx: u64, cont: &str| {
        serde_json::json!({"doc_id": 0, "idx": idx, "label": 1,
            "doc": {"choices": ["naïve", "plain"]},
            "request": {"context": "Q", "continuation": cont}})
        .to_string()
    };
    std::fs::write(&p, [line(0, " naïve"), line(1, " plain")].join("\n")).unwrap();
    let t = load_task("piqa", &p).unwrap();
    assert_eq!(t.docs[0].choices[0].text, "naïve");
    assert_eq!(t.docs[0].choices[0].text.chars().count(), 5);
}

#[test]
fn acc_norm_ties_go_to_the_first_choice_as_np_argmax() {
    // "ab" (2 chars, ll −2) and "abcd" (4 chars, ll −4): both −1 per character, a tie;
    // np.argmax takes the first. Gold 0: acc_norm 1; gold 1: acc_norm 0. Raw lls pick
    // the first too (−2 > −4).
    assert_eq!(
        acc_and_norm(&[(" ab", -2.0), (" abcd", -4.0)], 0),
        (1.0, 1.0)
    );
    assert_eq!(
        acc_and_norm(&[(" ab", -2.0), (" abcd", -4.0)], 1),
        (0.0, 0.0)
    );
}

#[test]
fn winogrande_partial_scoring_from_the_hf_format() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("winogrande.jsonl");
    std::fs::write(&p, r#"{"sentence": "The trophy did not fit in the suitcase because _ was too big.", "option1": "the trophy", "option2": "the suitcase", "answer": "1"}"#).unwrap();
    let t = load_task("winogrande", &p).unwrap();
    assert_eq!(t.docs[0].gold, 0);
    assert_eq!(
        t.docs[0].choices[0].context,
        "The trophy did not fit in the suitcase because the trophy"
    );
    assert_eq!(t.docs[0].choices[1].continuation, " was too big.");
    // The option fills the blank; only the shared suffix is scored.
    let ll = HashMap::from([
        (
            (
                "The trophy did not fit in the suitcase because the trophy".into(),
                " was too big.".into(),
            ),
            (-5.0, false),
        ),
        (
            (
                "The trophy did not fit in the suitcase because the suitcase".into(),
                " was too big.".into(),
            ),
            (-7.0, false),
        ),
    ]);
    let r = evaluate(&t, &tok(), &Hand { tok: tok(), ll }, None).unwrap();
    assert_eq!(r.metrics["acc"].value, 1.0);
    assert!(!r.metrics.contains_key("acc_norm"));
}

#[test]
fn lambada_accuracy_is_greedy_match_and_perplexity_is_exp_of_mean_nll() {
    let task = Task {
        name: "lambada".into(),
        docs: vec![
            doc("It was a dark and stormy", &[" night"], 0),
            doc("She opened the", &[" door"], 0),
        ],
    };
    let ll = HashMap::from([
        (
            ("It was a dark and stormy".into(), " night".into()),
            (-1.0, true),
        ),
        (("She opened the".into(), " door".into()), (-3.0, false)),
    ]);
    let r = evaluate(&task, &tok(), &Hand { tok: tok(), ll }, None).unwrap();
    assert_eq!(r.metrics["acc"].value, 0.5);
    assert!((r.metrics["perplexity"].value - 2f64.exp()).abs() < 1e-9);
    assert!(r.metrics["perplexity"].stderr > 0.0);
}

#[test]
fn request_files_group_by_document_and_skip_unconditional_requests() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("piqa.jsonl");
    let line = |doc: u64, idx: u64, ctx: &str, cont: &str, label: u64| {
        serde_json::json!({"request_type": "loglikelihood", "doc_id": doc, "idx": idx, "label": label, "request": {"context": ctx, "continuation": cont}}).to_string()
    };
    let text = [
        line(0, 1, "Goal: a\nAnswer:", " second", 1),
        line(0, 0, "Goal: a\nAnswer:", " first", 1),
        line(1_000_000, 0, "Answer:", " first", 1),
        line(1, 0, "Goal: b\nAnswer:", " x", 0),
        line(1, 1, "Goal: b\nAnswer:", " y", 0),
    ]
    .join("\n");
    std::fs::write(&p, text).unwrap();
    let t = load_task("piqa", &p).unwrap();
    assert_eq!(t.docs.len(), 2);
    assert_eq!(t.docs[0].choices[0].continuation, " first");
    assert_eq!(t.docs[0].gold, 1);
    assert!(load_task("bogus", &p).is_err());
    std::fs::write(&p, "{\"doc_id\": 0}\n").unwrap();
    assert!(load_task("piqa", &p)
        .err()
        .unwrap()
        .to_string()
        .contains("piqa.jsonl"));
    // A document listing fewer choices than its requests is an error naming the file.
    std::fs::write(
        &p,
        serde_json::json!({"doc_id": 0, "idx": 2, "label": 0, "doc": {"choices": ["a"]},
            "request": {"context": "Q", "continuation": " c"}})
        .to_string(),
    )
    .unwrap();
    let err = load_task("piqa", &p).err().unwrap().to_string();
    assert!(
        err.contains("piqa.jsonl") && err.contains("doc.choices"),
        "{err}"
    );
}

#[test]
fn a_missing_task_file_names_the_folder_and_the_files_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let err = require_task_file(dir.path(), "piqa")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&dir.path().display().to_string())
            && err.contains("piqa/requests.jsonl.gz")
            && err.contains("fetch-eval-data.sh"),
        "{err}"
    );
}

#[test]
fn harness_tokenization_moves_trailing_spaces_and_uses_eot_for_empty_contexts() {
    let t = tok();
    let (c, k) = encode_pair(&t, "Hello ", "world").unwrap();
    assert_eq!((c, k), (vec![15496], vec![995]));
    let (c, k) = encode_pair(&t, "", "Hello").unwrap();
    assert_eq!((c, k), (vec![50256], vec![15496]));
}

#[test]
fn truncation_and_batching_do_not_change_scores() {
    let cfg = Gpt2Config::new(50257, 16, 8, 1, 2).with_dropout(0.0);
    let m = AnyModel::Gpt2(Gpt2::new(&cfg, &mut Params::random(3, &Device::Cpu, false)).unwrap());
    let s = ModelScorer {
        model: &m,
        max_len: 16,
    };
    let t = tok();
    // Longer than the 16-token window, so every request is left-truncated.
    let long_ctx: String =
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            .repeat(3);
    let group: Vec<(Vec<u32>, Vec<u32>)> = ["fifteen", "sixteen and more", "x"]
        .iter()
        .map(|c| encode_pair(&t, &long_ctx, c).unwrap())
        .collect();
    let together = s.score(&group).unwrap();
    for (i, g) in group.iter().enumerate() {
        let alone = s.score(std::slice::from_ref(g)).unwrap()[0];
        assert!(
            (alone.0 - together[i].0).abs() < 1e-4,
            "batching changed choice {i}: {alone:?} vs {:?}",
            together[i]
        );
        // Manual left truncation: the last 16 + 1 tokens, input = all but the last.
        let whole: Vec<u32> = g.0.iter().chain(&g.1).copied().collect();
        let tail = &whole[whole.len() - 17..];
        let x = Tensor::new(&tail[..16], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<Vec<f32>> = m.logits(&x).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let k = g.1.len();
        let mut ll = 0f64;
        for p in 16 - k..16 {
            let row = &logits[p];
            let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = mx + row.iter().map(|&z| (z as f64 - mx).exp()).sum::<f64>().ln();
            ll += row[tail[p + 1] as usize] as f64 - lse;
        }
        assert!(
            (ll - together[i].0).abs() < 1e-3,
            "truncated score {ll} vs {:?}",
            together[i]
        );
    }
}

#[test]
fn hugging_face_exports_become_harness_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let load = |task: &str, row: serde_json::Value| {
        let p = dir.path().join(format!("{task}.jsonl"));
        std::fs::write(&p, row.to_string()).unwrap();
        load_task(task, &p).unwrap().docs.remove(0)
    };
    let d = load(
        "lambada",
        serde_json::json!({"text": "he opened the door and saw his friend"}),
    );
    assert_eq!(
        (
            d.choices[0].context.as_str(),
            d.choices[0].continuation.as_str()
        ),
        ("he opened the door and saw his", " friend")
    );
    let d = load(
        "hellaswag",
        serde_json::json!({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "endings": ["is a.", "starts b."], "label": "1"}),
    );
    assert_eq!(
        d.choices[1].context,
        "Roof shingle removal: A man is sitting on a roof. He"
    );
    assert_eq!(
        (d.choices[1].continuation.as_str(), d.gold),
        (" starts b.", 1)
    );
    // lm-eval's preprocess and Python's str.capitalize (the rest lower-cased).
    let d = load(
        "hellaswag",
        serde_json::json!({"activity_label": "Cooking", "ctx_a": "A cook [header] stands.", "ctx_b": "the Man", "endings": ["cuts [step] bread.", "x"], "label": 0}),
    );
    assert_eq!(d.choices[0].context, "Cooking: A cook stands. The man");
    assert_eq!(d.choices[0].text, "cuts bread.");
    let d = load(
        "piqa",
        serde_json::json!({"goal": "Open a jar", "sol1": "twist", "sol2": "push", "label": 0}),
    );
    assert_eq!(
        (
            d.choices[0].context.as_str(),
            d.choices[1].continuation.as_str(),
            d.gold
        ),
        ("Question: Open a jar\nAnswer:", " push", 0)
    );
    let d = load(
        "siqa",
        serde_json::json!({"context": "Tracy won.", "question": "How does Tracy feel?", "answerA": "sad", "answerB": "happy", "answerC": "bored", "label": "2"}),
    );
    assert_eq!(
        (d.choices[0].context.as_str(), d.choices.len(), d.gold),
        ("Question: Tracy won. How does Tracy feel?\nAnswer:", 3, 1)
    );
    let d = load(
        "arc_easy",
        serde_json::json!({"question": "What is hot?", "choices": {"text": ["ice", "fire"], "label": ["A", "B"]}, "answerKey": "B"}),
    );
    assert_eq!((d.choices[1].continuation.as_str(), d.gold), (" fire", 1));
}
