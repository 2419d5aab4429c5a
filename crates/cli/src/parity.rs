//! `cocomix parity`: the golden tiny batch computed on the CPU and on this build's device
//! (CUDA / Metal), compared tensor by tensor within f32 tolerances.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use cocomix_attribution::{attribute, labels, LabelMode};
use cocomix_model::ops::concept_loss;
use cocomix_model::{next_token_loss, Dropout, Gpt2, Student};
use cocomix_sae::Sae;

#[derive(clap::Args)]
pub struct ParityArgs {
    /// Folder with the golden tiny weights (teacher/, student/, sae.safetensors, expected.safetensors).
    #[arg(long, default_value = "testdata/golden")]
    golden: PathBuf,
    #[arg(long)]
    json: bool,
}

/// Everything the golden batch yields on one device, moved to the CPU.
fn compute(golden: &Path, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let exp = candle_core::safetensors::load(golden.join("expected.safetensors"), &Device::Cpu)
        .context("reading expected.safetensors")?;
    let ids = exp["input_ids"].to_dtype(DType::U32)?.to_device(dev)?;
    let teacher = Gpt2::load(golden.join("teacher").to_str().unwrap_or_default(), dev)?;
    let sae = Sae::load_file(&golden.join("sae.safetensors"), dev)?;
    let student = Student::load(&golden.join("student"), dev)?;
    let rg = teacher.residual_grad(&ids, 1)?;
    let att = attribute(&teacher, &sae, &ids, 1)?;
    let (lab, _) = labels(&att, sae.n_latents(), 4, LabelMode::Faithful)?;
    let out = student.forward(&ids, &mut Dropout::off())?;
    let ntp = next_token_loss(&out.logits, &ids)?;
    let lab3 = lab.reshape((2, 16, 4))?;
    let total = (&ntp
        + (concept_loss(out.concept_logits.as_ref().expect("CoCoMix student"), &lab3)? * 0.1)?)?;
    let grads = total.backward()?;
    let mut v = vec![
        ("teacher_logits".to_string(), teacher.forward(&ids)?),
        ("teacher_resid_grad".into(), rg.grad),
        ("sae_z".into(), sae.dense(&att.codes)?),
        ("attribution".into(), att.scores),
        ("labels".into(), lab.to_dtype(DType::F32)?),
        ("student_logits".into(), out.logits),
        (
            "student_concept_logits".into(),
            out.concept_logits.expect("CoCoMix student"),
        ),
        ("loss_ntp".into(), ntp),
        ("loss_total".into(), total),
    ];
    for (name, var) in student.vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            v.push((format!("grad.{name}"), g.clone()));
        }
    }
    v.into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect()
}

pub fn run(a: ParityArgs) -> Result<()> {
    let dev = cocomix_trainer::default_device()?;
    let cpu = compute(&a.golden, &Device::Cpu)?;
    let other = compute(&a.golden, &dev)?;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for ((name, x), (_, y)) in cpu.iter().zip(&other) {
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let yv: Vec<f32> = y.flatten_all()?.to_vec1()?;
        // Tolerances for f32 on two backends: values 1e-4 relative, gradients 1e-3, labels exact.
        let (rtol, atol) = match name.as_str() {
            "labels" => (0.0, 0.0),
            n if n.starts_with("grad.") || n == "teacher_resid_grad" || n == "attribution" => {
                (1e-3, 1e-6)
            }
            _ => (1e-4, 1e-5),
        };
        let (mut max_abs, mut worst) = (0f32, f32::MIN);
        for (p, q) in xv.iter().zip(&yv) {
            max_abs = max_abs.max((p - q).abs());
            worst = worst.max((p - q).abs() - (atol + rtol * p.abs()));
        }
        let ok = worst <= 0.0;
        if !ok {
            failed.push(name.clone());
        }
        rows.push(serde_json::json!({ "tensor": name, "max_abs_diff": max_abs, "rtol": rtol, "atol": atol, "ok": ok }));
    }
    let report = serde_json::json!({ "device": format!("{dev:?}"), "compared": rows.len(), "failed": failed, "tensors": rows });
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for r in &rows {
            println!(
                "{:>36}  max |Δ| {:.3e}  {}",
                r["tensor"].as_str().unwrap_or_default(),
                r["max_abs_diff"].as_f64().unwrap_or(0.0),
                if r["ok"] == true { "ok" } else { "FAIL" }
            );
        }
        println!(
            "device {dev:?}: {} tensors, {} failed",
            rows.len(),
            failed.len()
        );
    }
    if !failed.is_empty() {
        bail!(
            "CPU and {dev:?} differ beyond tolerance on: {}",
            failed.join(", ")
        );
    }
    Ok(())
}
