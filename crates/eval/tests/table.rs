//! Table 1 from hand-set scores.
use std::collections::BTreeMap;

use cocomix_eval::tasks::{Metric, TaskResult};
use cocomix_eval::{build_table1, render_markdown, ModelScores, RunInfo, TextScore};

fn task(name: &str, metrics: &[(&str, f64)]) -> TaskResult {
    TaskResult {
        task: name.into(),
        samples: 10,
        metrics: metrics
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Metric {
                        value: *v,
                        stderr: 0.0,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
    }
}

fn wiki(word_perplexity: f64) -> TextScore {
    TextScore {
        tokens: 100,
        nll: 3.0,
        ppl: 3f64.exp(),
        seq_len: 16,
        words: 80,
        word_perplexity,
        bytes: 400,
        bits_per_byte: 1.0,
    }
}

fn info(run: &str, val_ppl: Option<f64>) -> RunInfo {
    RunInfo {
        run: run.into(),
        method: "cocomix".into(),
        params: 1_234_567,
        val_ppl,
    }
}

#[test]
fn averages_are_the_paper_s_means_of_three_perplexities_and_five_accuracies() {
    let full = ModelScores {
        tasks: vec![
            task("lambada", &[("acc", 0.3), ("perplexity", 40.0)]),
            // HellaSwag reports acc_norm; the others acc.
            task("hellaswag", &[("acc", 0.9), ("acc_norm", 0.30)]),
            task("piqa", &[("acc", 0.60), ("acc_norm", 0.99)]),
            task("siqa", &[("acc", 0.40)]),
            task("arc_easy", &[("acc", 0.45)]),
            task("winogrande", &[("acc", 0.50)]),
        ],
        wikitext: Some(wiki(50.0)),
    };
    let partial = ModelScores {
        tasks: vec![task("piqa", &[("acc", 0.5)])],
        wikitext: None,
    };
    let t = build_table1(&[
        (info("a", Some(30.0)), full),
        (info("b", Some(20.0)), partial),
    ]);
    let a = &t.rows[0];
    assert_eq!(
        (a.val_ppl, a.lambada_ppl, a.wikitext_ppl),
        (Some(30.0), Some(40.0), Some(50.0))
    );
    assert_eq!(a.avg_ppl, Some(40.0)); // (30 + 40 + 50) / 3
    assert_eq!(
        [a.hellaswag, a.piqa, a.siqa, a.arc_easy, a.winogrande],
        [Some(30.0), Some(60.0), Some(40.0), Some(45.0), Some(50.0)]
    );
    assert!((a.avg_acc.unwrap() - 45.0).abs() < 1e-12); // (30 + 60 + 40 + 45 + 50) / 5
    let b = &t.rows[1];
    assert_eq!((b.piqa, b.hellaswag), (Some(50.0), None));
    assert_eq!(
        (b.avg_ppl, b.avg_acc),
        (None, None),
        "no average of a subset"
    );
    let md = render_markdown(&t);
    assert!(
        md.contains("| a | cocomix | 1.23M | 30.0 | 40.0 | 50.0 | 30.0 | 60.0 | 40.0 | 45.0 | 50.0 | 40.0 | 45.0 |"),
        "{md}"
    );
    assert!(
        md.contains("| b | cocomix | 1.23M | 20.0 | - | - | - | 50.0 | - | - | - | - | - |"),
        "{md}"
    );
}
