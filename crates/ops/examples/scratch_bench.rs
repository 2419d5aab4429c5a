use candle_core::{Device, Module, Tensor, Var};
use cocomix_ops::fused::with_fused;
use std::time::Instant;
fn time<F: FnMut()>(name: &str, flops: f64, mut f: F) {
    f();
    let n = 3;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    println!("{name}: {:.1} ms  {:.1} GFLOP/s", s * 1e3, flops / s / 1e9);
}
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for &(b, s, h, hd) in &[
        (16usize, 128usize, 4usize, 28usize),
        (1, 1024, 8, 78),
        (1, 2048, 8, 64),
    ] {
        let d = h * hd;
        let qkv = Tensor::randn(0f32, 1.0, (b, s, 3 * d), &dev)?;
        let key = Some(cocomix_ops::DropoutKey::new(1, 1, 0.1));
        let fl = 4.0 * (b * h) as f64 * (s * s) as f64 / 2.0 * hd as f64;
        for fused in [true, false] {
            with_fused(fused, || {
                time(
                    &format!("attn fwd b{b} s{s} h{h} hd{hd} fused={fused}"),
                    fl,
                    || {
                        cocomix_ops::causal_attention_qkv(&qkv, h, 0.1, key).unwrap();
                    },
                );
                let x = Var::from_tensor(&qkv).unwrap();
                time(&format!("attn fwd+bwd fused={fused}"), fl * 3.5, || {
                    let y = cocomix_ops::causal_attention_qkv(x.as_tensor(), h, 0.1, key).unwrap();
                    y.sum_all().unwrap().backward().unwrap();
                });
            });
        }
        let x = Tensor::randn(0f32, 1.0, (b * s, d), &dev)?;
        let ln = cocomix_ops::LayerNorm {
            weight: Tensor::ones(d, candle_core::DType::F32, &dev)?,
            bias: Tensor::zeros(d, candle_core::DType::F32, &dev)?,
            eps: 1e-5,
        };
        for fused in [true, false] {
            with_fused(fused, || {
                let xv = Var::from_tensor(&x).unwrap();
                time(&format!("ln fwd+bwd fused={fused}"), 0.0, || {
                    ln.forward(xv.as_tensor())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                });
                let h4 = Tensor::randn(0f32, 1.0, (b * s, 4 * d), &dev).unwrap();
                let bb = Tensor::zeros(4 * d, candle_core::DType::F32, &dev).unwrap();
                let hv = Var::from_tensor(&h4).unwrap();
                time(&format!("gelu fwd+bwd fused={fused}"), 0.0, || {
                    cocomix_ops::bias_gelu(hv.as_tensor(), &bb)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                });
            });
        }
    }
    let z = Tensor::randn(0f32, 1.0, (1024, 50257), &dev)?;
    let t = Tensor::zeros(1024, candle_core::DType::U32, &dev)?;
    for fused in [true, false] {
        with_fused(fused, || {
            let zv = Var::from_tensor(&z).unwrap();
            time(&format!("xent fwd+bwd fused={fused}"), 0.0, || {
                cocomix_ops::cross_entropy(zv.as_tensor(), &t)
                    .unwrap()
                    .backward()
                    .unwrap();
            });
        });
    }
    Ok(())
}
