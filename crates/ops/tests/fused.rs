//! Every fused CPU kernel against its composed (unfused) Candle form: values within 1e-5,
//! and gradients against central finite differences of the composed form in f64.
use candle_core::{DType, Device, Tensor, Var};
use cocomix_ops::adamw::{sum_squares, AdamWStep};
use cocomix_ops::fused::with_fused;
use cocomix_ops::{
    add_dropout, bias_add, bias_gelu, bias_gelu_composed, causal_attention,
    causal_attention_composed, causal_attention_qkv, compress_kept, compress_kept_composed,
    concept_loss, cross_entropy, kd_kl, layer_norm_composed, linear, linear_composed,
    softmax_cross_entropy, softmax_cross_entropy_composed, softmax_kl, softmax_kl_composed,
    unbiased_layer_norm, unbiased_layer_norm_composed, DropoutKey, LayerNorm, WeightLayout,
};

type R = candle_core::Result<()>;
const DEV: Device = Device::Cpu;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A fixed pseudo-random fill (Candle's randn is not seedable).
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let mut u = 0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                u += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (u - 2.0) * 1.7
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let d = max_diff(a, b);
    assert!(d <= tol, "{what}: max |fused − composed| = {d:e} > {tol:e}");
}

/// Checks `grad` (from the fused kernel) against central differences of the scalar
/// `f(x)` evaluated in f64 on every `stride`-th element of `x`.
fn check_grad(
    what: &str,
    f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    x: &Tensor,
    grad: &Tensor,
    stride: usize,
) {
    let shape = x.dims().to_vec();
    let base: Vec<f64> = x
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let g: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let eval = |v: &[f64]| -> f64 {
        let t = Tensor::from_slice(v, shape.as_slice(), &DEV).unwrap();
        f(&t).unwrap().to_scalar::<f64>().unwrap()
    };
    let eps = 1e-5;
    let mut worst = 0f64;
    for i in (0..base.len()).step_by(stride) {
        let mut v = base.clone();
        v[i] = base[i] + eps;
        let up = eval(&v);
        v[i] = base[i] - eps;
        let down = eval(&v);
        let fd = (up - down) / (2.0 * eps);
        let err = (fd - g[i] as f64).abs() / (1.0 + fd.abs());
        worst = worst.max(err);
        assert!(
            err < 2e-4,
            "{what}: ∂/∂x[{i}] fused {} vs finite differences {fd}",
            g[i]
        );
    }
    assert!(worst.is_finite());
}

/// `Σ w ⊙ y`: a loss that weights every output differently.
fn weighted(y: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    y.mul(&w.to_dtype(y.dtype())?)?.sum_all()
}

fn grad_of(loss: &Tensor, v: &Var) -> Tensor {
    loss.backward().unwrap().get(v.as_tensor()).unwrap().clone()
}

#[test]
fn layer_norm_matches_composed_and_finite_differences() -> R {
    let (n, d) = (37, 70);
    let x = randn(&[n, d], 1);
    let w = randn(&[d], 2).affine(0.3, 1.0)?;
    let b = (randn(&[d], 3) * 0.1)?;
    let wy = randn(&[n, d], 4);
    let (xv, wv, bv) = (
        Var::from_tensor(&x)?,
        Var::from_tensor(&w)?,
        Var::from_tensor(&b)?,
    );
    let ln = LayerNorm {
        weight: wv.as_tensor().clone(),
        bias: bv.as_tensor().clone(),
        eps: 1e-5,
    };
    let y = candle_core::Module::forward(&ln, xv.as_tensor())?;
    let y_ref = layer_norm_composed(&x, &w, &b, 1e-5)?;
    assert_close("layer norm", &y, &y_ref, 1e-5);
    let grads = weighted(&y, &wy)?.backward()?;
    let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    check_grad(
        "layer norm dx",
        &|x| weighted(&layer_norm_composed(x, &f64_(&w), &f64_(&b), 1e-5)?, &wy),
        &x,
        grads.get(xv.as_tensor()).unwrap(),
        3,
    );
    check_grad(
        "layer norm dw",
        &|w| weighted(&layer_norm_composed(&f64_(&x), w, &f64_(&b), 1e-5)?, &wy),
        &w,
        grads.get(wv.as_tensor()).unwrap(),
        1,
    );
    check_grad(
        "layer norm db",
        &|b| weighted(&layer_norm_composed(&f64_(&x), &f64_(&w), b, 1e-5)?, &wy),
        &b,
        grads.get(bv.as_tensor()).unwrap(),
        1,
    );
    Ok(())
}

#[test]
fn unbiased_layer_norm_matches_composed_and_finite_differences() -> R {
    let (n, d) = (23, 50);
    let x = randn(&[2, n, d], 5).affine(3.0, 0.5)?;
    let (w1, w2, w3) = (
        randn(&[2, n, d], 6),
        randn(&[2, n, 1], 7),
        randn(&[2, n, 1], 8),
    );
    let xv = Var::from_tensor(&x)?;
    let (xn, mu, std) = unbiased_layer_norm(xv.as_tensor(), 1e-5)?;
    let (xn_r, mu_r, std_r) = unbiased_layer_norm_composed(&x, 1e-5)?;
    assert_close("x̂", &xn, &xn_r, 1e-5);
    assert_close("mean", &mu, &mu_r, 1e-5);
    assert_close("std", &std, &std_r, 1e-5);
    let loss = |(a, b, c): (Tensor, Tensor, Tensor)| -> candle_core::Result<Tensor> {
        weighted(&a, &w1)? + weighted(&b, &w2)? + weighted(&c, &w3)?
    };
    let g = grad_of(&loss((xn, mu, std))?, &xv);
    check_grad(
        "unbiased layer norm dx",
        &|x| loss(unbiased_layer_norm_composed(x, 1e-5)?),
        &x,
        &g,
        3,
    );
    // A constant row has std 0: finite gradients, as the mean still moves with x.
    let c = Var::from_tensor(&Tensor::ones((1, 4), DType::F32, &DEV)?)?;
    let (a, b, s) = unbiased_layer_norm(c.as_tensor(), 1e-5)?;
    let g = grad_of(&(a.sum_all()? + b.sum_all()? + s.sum_all()?)?, &c);
    assert!(g
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite()));
    Ok(())
}

#[test]
fn bias_gelu_matches_composed_and_finite_differences() -> R {
    let (n, d) = (19, 45);
    let x = (randn(&[n, d], 9) * 2.5)?;
    let b = randn(&[d], 10);
    let wy = randn(&[n, d], 11);
    let (xv, bv) = (Var::from_tensor(&x)?, Var::from_tensor(&b)?);
    let y = bias_gelu(xv.as_tensor(), bv.as_tensor())?;
    assert_close("bias gelu", &y, &bias_gelu_composed(&x, &b)?, 1e-5);
    let grads = weighted(&y, &wy)?.backward()?;
    let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    check_grad(
        "gelu dx",
        &|x| weighted(&bias_gelu_composed(x, &f64_(&b))?, &wy),
        &x,
        grads.get(xv.as_tensor()).unwrap(),
        2,
    );
    check_grad(
        "gelu db",
        &|b| weighted(&bias_gelu_composed(&f64_(&x), b)?, &wy),
        &b,
        grads.get(bv.as_tensor()).unwrap(),
        1,
    );
    // Far tails: exactly 0 and x, no NaN from exp overflow.
    let t = Tensor::new(&[[-100f32, -30.0, 30.0, 100.0]], &DEV)?;
    let y = bias_gelu(&t, &Tensor::zeros(4, DType::F32, &DEV)?)?.to_vec2::<f32>()?;
    assert_eq!(y[0][2..], [30.0, 100.0]);
    assert!(y[0][..2].iter().all(|v| v.abs() < 1e-30));
    Ok(())
}

#[test]
fn compress_on_the_kept_logits_matches_composed_and_finite_differences() -> R {
    // 140 rows (three row blocks) of 600 concepts (two concept blocks of the weight
    // gradient), 5 kept per row, width 9; row 3 keeps concept 7 twice.
    let (b, t, c, k, d) = (2, 70, 600, 5, 9);
    let n = b * t;
    let z = randn(&[b, t, c], 60);
    let w = randn(&[d, c], 61);
    let wy = randn(&[n, d], 62);
    let mut idx: Vec<u32> = (0..n * k)
        .map(|p| ((p / k * 37 + (p % k) * 113) % c) as u32)
        .collect();
    idx[3 * k + 1] = 7;
    idx[3 * k + 2] = 7;
    let idx = Tensor::from_vec(idx, (n, k), &DEV)?;
    let (zv, wv) = (Var::from_tensor(&z)?, Var::from_tensor(&w)?);
    let y = compress_kept(zv.as_tensor(), &idx, wv.as_tensor())?;
    assert_close("compress", &y, &compress_kept_composed(&z, &idx, &w)?, 1e-5);
    let g = weighted(&y, &wy)?.backward()?;
    let (dz, dw) = (
        g.get(zv.as_tensor()).unwrap(),
        g.get(wv.as_tensor()).unwrap(),
    );
    // Against the composed form's own gradients everywhere (most entries are exact zeros)...
    let (zc, wc) = (Var::from_tensor(&z)?, Var::from_tensor(&w)?);
    let gc = weighted(
        &compress_kept_composed(zc.as_tensor(), &idx, wc.as_tensor())?,
        &wy,
    )?
    .backward()?;
    assert_close("compress dz", dz, gc.get(zc.as_tensor()).unwrap(), 1e-5);
    assert_close("compress dW", dw, gc.get(wc.as_tensor()).unwrap(), 1e-5);
    // ...and finite differences at kept entries and elsewhere.
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    check_grad(
        "compress dz",
        &|z| weighted(&compress_kept_composed(z, &idx, &f(&w))?, &wy),
        &z,
        dz,
        389,
    );
    check_grad(
        "compress dW",
        &|w| weighted(&compress_kept_composed(&f(&z), &idx, w)?, &wy),
        &w,
        dw,
        7,
    );
    // A second backward over the same graph gives the same gradients.
    let again = weighted(&y, &wy)?.backward()?;
    assert_close(
        "compress dz again",
        again.get(zv.as_tensor()).unwrap(),
        dz,
        0.0,
    );
    assert_close(
        "compress dW again",
        again.get(wv.as_tensor()).unwrap(),
        dw,
        0.0,
    );
    // An index past the last concept is an error, not a panic.
    let bad = Tensor::from_vec(vec![c as u32; n * k], (n, k), &DEV)?;
    let err = compress_kept(&z, &bad, &w).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
    assert!(compress_kept(&z, &idx, &w.t()?).is_err());
    Ok(())
}

#[test]
fn linear_matches_composed_and_finite_differences() -> R {
    // x [2, 37, 23] against W in both layouts, with and without the bias.
    let (d_in, d_out) = (23, 29);
    let x = randn(&[2, 37, d_in], 40);
    let wy = randn(&[2, 37, d_out], 41);
    let b = randn(&[d_out], 42);
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        let w = match layout {
            WeightLayout::InOut => randn(&[d_in, d_out], 43),
            WeightLayout::OutIn => randn(&[d_out, d_in], 43),
        };
        for bias in [true, false] {
            let what = format!("linear {layout:?}, bias {bias}");
            let (xv, wv, bv) = (
                Var::from_tensor(&x)?,
                Var::from_tensor(&w)?,
                Var::from_tensor(&b)?,
            );
            let y = linear(
                xv.as_tensor(),
                wv.as_tensor(),
                bias.then(|| bv.as_tensor()),
                layout,
            )?;
            let reference = linear_composed(&x, &w, bias.then_some(&b), layout)?;
            assert_close(&what, &y, &reference, 1e-5);
            let g = weighted(&y, &wy)?.backward()?;
            let composed = |x: &Tensor, w: &Tensor, b: &Tensor| {
                weighted(&linear_composed(x, w, bias.then_some(b), layout)?, &wy)
            };
            check_grad(
                &format!("{what}: dx"),
                &|x| composed(x, &f(&w), &f(&b)),
                &x,
                g.get(xv.as_tensor()).unwrap(),
                13,
            );
            check_grad(
                &format!("{what}: dW"),
                &|w| composed(&f(&x), w, &f(&b)),
                &w,
                g.get(wv.as_tensor()).unwrap(),
                7,
            );
            if bias {
                check_grad(
                    &format!("{what}: db"),
                    &|b| composed(&f(&x), &f(&w), b),
                    &b,
                    g.get(bv.as_tensor()).unwrap(),
                    1,
                );
            } else {
                assert!(g.get(bv.as_tensor()).is_none(), "{what}: unused bias");
            }
        }
        // A frozen weight (outside the graph): the input's gradient only, the same as with
        // a trainable one.
        let xv = Var::from_tensor(&x)?;
        let y = linear(xv.as_tensor(), &w, Some(&b), layout)?;
        let g = weighted(&y, &wy)?.backward()?;
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
        let wv = Var::from_tensor(&w)?;
        let y2 = linear(xv.as_tensor(), wv.as_tensor(), Some(&b), layout)?;
        let g2 = weighted(&y2, &wy)?.backward()?;
        let (dx, dx2) = (
            g.get(xv.as_tensor()).unwrap(),
            g2.get(xv.as_tensor()).unwrap(),
        );
        assert_close("linear, frozen W: dx", dx, dx2, 0.0);
    }
    // The product splits the output over threads, never the inner sum: bit-identical for
    // any thread count.
    let w = randn(&[d_in, 300], 44);
    let big = randn(&[700, d_in], 45);
    let run = |threads: usize| -> Vec<f32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let y = linear(&big, &w, None, WeightLayout::InOut).unwrap();
            y.flatten_all().unwrap().to_vec1().unwrap()
        })
    };
    assert_eq!(run(1), run(3));
    // A wrong input width or bias shape is an error, not a panic.
    assert!(linear(&x, &randn(&[d_out, d_out], 46), None, WeightLayout::InOut).is_err());
    let w = randn(&[d_in, d_out], 47);
    let b2 = b.unsqueeze(0)?; // [1, out]
    assert!(linear(&x, &w, Some(&b2), WeightLayout::InOut).is_err());
    assert!(with_fused(false, || linear(&x, &w, Some(&b2), WeightLayout::InOut)).is_err());
    Ok(())
}

#[test]
fn bias_add_and_residual_dropout_match_composed_and_finite_differences() -> R {
    let (n, d) = (3000, 21); // several row blocks for the bias-gradient sum
    let x = randn(&[n, d], 30);
    let y = randn(&[n, d], 31);
    let b = randn(&[d], 32);
    let wy = randn(&[n, d], 33);
    let key = DropoutKey::new(4, 7, 0.3);
    let (xv, yv, bv) = (
        Var::from_tensor(&x)?,
        Var::from_tensor(&y)?,
        Var::from_tensor(&b)?,
    );
    let out = add_dropout(
        xv.as_tensor(),
        &bias_add(yv.as_tensor(), bv.as_tensor())?,
        Some(key),
    )?;
    let composed = |x: &Tensor, y: &Tensor, b: &Tensor| -> candle_core::Result<Tensor> {
        let mask = Tensor::from_vec(key.mask(n, d), (n, d), &DEV)?.to_dtype(x.dtype())?;
        x + y.broadcast_add(b)?.mul(&mask)?
    };
    assert_close("x + dropout(y + b)", &out, &composed(&x, &y, &b)?, 1e-6);
    let g = weighted(&out, &wy)?.backward()?;
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    check_grad(
        "residual dx",
        &|x| weighted(&composed(x, &f(&y), &f(&b))?, &wy),
        &x.narrow(0, 0, n)?,
        g.get(xv.as_tensor()).unwrap(),
        97,
    );
    check_grad(
        "residual dy",
        &|y| weighted(&composed(&f(&x), y, &f(&b))?, &wy),
        &y,
        g.get(yv.as_tensor()).unwrap(),
        97,
    );
    check_grad(
        "bias db",
        &|b| weighted(&composed(&f(&x), &f(&y), b)?, &wy),
        &b,
        g.get(bv.as_tensor()).unwrap(),
        1,
    );
    // Without a key it is a plain sum.
    let plain = add_dropout(&x, &y, None)?;
    assert_close("x + y", &plain, &(&x + &y)?, 0.0);
    Ok(())
}

#[test]
fn cross_entropy_matches_composed_and_finite_differences() -> R {
    let (n, v) = (29, 300);
    let z = (randn(&[n, v], 12) * 3.0)?;
    for k in [1usize, 3] {
        let t: Vec<u32> = (0..n * k).map(|i| ((i * 7919) % v) as u32).collect();
        let t = Tensor::from_vec(t, (n, k), &DEV)?;
        let zv = Var::from_tensor(&z)?;
        let loss = softmax_cross_entropy(zv.as_tensor(), &t)?;
        let want = softmax_cross_entropy_composed(&z, &t)?;
        assert_close("cross-entropy", &loss, &want, 1e-5);
        let g = grad_of(&(loss * 2.5)?, &zv);
        check_grad(
            "cross-entropy dz",
            &|z| softmax_cross_entropy_composed(z, &t)? * 2.5,
            &z,
            &g,
            7,
        );
    }
    // The public losses take this path: next-token CE (targets [N]) and the concept loss.
    let t1 = Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), n, &DEV)?;
    let ce = cross_entropy(&z, &t1)?.to_scalar::<f32>()?;
    let want = candle_nn::loss::cross_entropy(&z, &t1)?.to_scalar::<f32>()?;
    assert!((ce - want).abs() < 1e-5);
    let labels = Tensor::from_vec((0..n as u32 * 2).collect::<Vec<_>>(), (1, n, 2), &DEV)?;
    let cl = concept_loss(&z.unsqueeze(0)?, &labels).unwrap();
    let want = with_fused(false, || concept_loss(&z.unsqueeze(0)?, &labels)).unwrap();
    assert_close("concept loss", &cl, &want, 1e-5);
    // [B, T, V] logits go in as they are: the same loss, a gradient of their shape equal to
    // the [N, V] one; rows that do not match are an error.
    let zv = Var::from_tensor(&z.reshape((1, n, v))?)?;
    let ce3 = cross_entropy(zv.as_tensor(), &t1.unsqueeze(0)?)?;
    assert_close(
        "cross-entropy [B, T, V]",
        &ce3,
        &cross_entropy(&z, &t1)?,
        0.0,
    );
    let zv2 = Var::from_tensor(&z)?;
    let g2 = grad_of(&cross_entropy(zv2.as_tensor(), &t1)?, &zv2);
    assert_close(
        "cross-entropy [B, T, V] dz",
        &grad_of(&ce3, &zv),
        &g2.unsqueeze(0)?,
        0.0,
    );
    assert!(cross_entropy(&z, &t1.narrow(0, 0, n - 1)?).is_err());
    assert!(
        cross_entropy(zv.as_tensor(), &t1.unsqueeze(1)?).is_err(),
        "[1, N] vs [N, 1] rows"
    );
    // Out-of-range targets are an error, not a panic.
    let bad = Tensor::new(&[[v as u32]], &DEV)?;
    assert!(softmax_cross_entropy(&z.narrow(0, 0, 1)?, &bad).is_err());
    Ok(())
}

#[test]
fn distillation_kl_matches_composed_and_finite_differences() -> R {
    let (n, v) = (23, 300);
    let s = (randn(&[n, v], 21) * 3.0)?;
    let t = (randn(&[n, v], 22) * 2.0)?;
    for tau in [1.0, 2.0] {
        let sv = Var::from_tensor(&s)?;
        let kl = softmax_kl(sv.as_tensor(), &t, tau)?;
        let want = softmax_kl_composed(&s, &t, tau)?;
        assert_close("distillation KL", &kl, &want, 1e-5);
        assert!(
            kl.to_scalar::<f32>()? > 0.1,
            "distinct distributions are apart"
        );
        let g = grad_of(&(kl * 1.5)?, &sv);
        check_grad(
            "distillation KL ds",
            &|s| softmax_kl_composed(s, &t.to_dtype(DType::F64)?, tau)? * 1.5,
            &s,
            &g,
            5,
        );
    }
    // KL of a distribution with itself is 0, with a zero gradient.
    let sv = Var::from_tensor(&s)?;
    let same = softmax_kl(sv.as_tensor(), &s, 1.0)?;
    assert!(same.to_scalar::<f32>()?.abs() < 1e-5);
    assert!(max_diff(&grad_of(&same, &sv), &s.zeros_like()?) < 1e-7);
    // The trainer's entry ([B, T, V] logits) takes the fused path and gives no teacher gradient.
    let tv = Var::from_tensor(&t)?;
    let kd = kd_kl(
        &sv.as_tensor().unsqueeze(0)?,
        &tv.as_tensor().unsqueeze(0)?,
        1.0,
    )
    .unwrap();
    let grads = kd.backward()?;
    assert!(grads.get(tv.as_tensor()).is_none(), "the teacher is frozen");
    let want = with_fused(false, || {
        kd_kl(&s.unsqueeze(0).unwrap(), &t.unsqueeze(0).unwrap(), 1.0)
    })
    .unwrap();
    assert_close("kd_kl", &kd, &want, 1e-5);
    // Mismatched shapes and a bad temperature are errors, not panics.
    assert!(softmax_kl(&s, &t.narrow(1, 0, 10)?, 1.0).is_err());
    assert!(softmax_kl(&s, &t, 0.0).is_err());
    Ok(())
}

fn attention_case(
    (b, h, hkv, sq, skv, hd): (usize, usize, usize, usize, usize, usize),
    dropout: Option<DropoutKey>,
    fd_stride: usize,
) -> R {
    let q = randn(&[b, h, sq, hd], 13);
    let k = randn(&[b, hkv, skv, hd], 14);
    let v = randn(&[b, hkv, skv, hd], 15);
    let wy = randn(&[b, h, sq, hd], 16);
    let scale = 1.0 / (hd as f64).sqrt();
    let (qv, kv, vv) = (
        Var::from_tensor(&q)?,
        Var::from_tensor(&k)?,
        Var::from_tensor(&v)?,
    );
    let y = causal_attention(
        qv.as_tensor(),
        kv.as_tensor(),
        vv.as_tensor(),
        scale,
        dropout,
    )?;
    let y_ref = causal_attention_composed(&q, &k, &v, scale, dropout)?;
    assert_close("attention", &y, &y_ref, 1e-5);
    let grads = weighted(&y, &wy)?.backward()?;
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let (q64, k64, v64) = (f(&q), f(&k), f(&v));
    check_grad(
        "attention dq",
        &|x| {
            weighted(
                &causal_attention_composed(x, &k64, &v64, scale, dropout)?,
                &wy,
            )
        },
        &q,
        grads.get(qv.as_tensor()).unwrap(),
        fd_stride,
    );
    check_grad(
        "attention dk",
        &|x| {
            weighted(
                &causal_attention_composed(&q64, x, &v64, scale, dropout)?,
                &wy,
            )
        },
        &k,
        grads.get(kv.as_tensor()).unwrap(),
        fd_stride,
    );
    check_grad(
        "attention dv",
        &|x| {
            weighted(
                &causal_attention_composed(&q64, &k64, x, scale, dropout)?,
                &wy,
            )
        },
        &v,
        grads.get(vv.as_tensor()).unwrap(),
        fd_stride,
    );
    Ok(())
}

#[test]
fn attention_matches_composed_and_finite_differences() -> R {
    // Several query and key tiles (64), a partial last tile.
    attention_case((2, 2, 2, 150, 150, 5), None, 11)
}

#[test]
fn attention_with_dropout_draws_the_composed_mask() -> R {
    attention_case((1, 2, 2, 70, 70, 6), Some(DropoutKey::new(3, 1, 0.25)), 7)
}

#[test]
fn grouped_query_attention_with_a_kv_offset() -> R {
    // 4 query heads on 2 key/value heads; 20 queries after 80 cached positions.
    attention_case((2, 4, 2, 20, 100, 8), Some(DropoutKey::new(9, 0, 0.1)), 5)
}

#[test]
fn packed_attention_matches_the_head_form() -> R {
    let (b, s, h, hd) = (2, 67, 3, 7);
    let d = h * hd;
    let qkv = randn(&[b, s, 3 * d], 17);
    let wy = randn(&[b, s, d], 18);
    let key = Some(DropoutKey::new(5, 2, 0.2));
    let x = Var::from_tensor(&qkv)?;
    let y = causal_attention_qkv(x.as_tensor(), h, 0.3, key)?;
    let y_ref = with_fused(false, || causal_attention_qkv(&qkv, h, 0.3, key))?;
    assert_close("packed attention", &y, &y_ref, 1e-5);
    let g = grad_of(&weighted(&y, &wy)?, &x);
    let x2 = Var::from_tensor(&qkv)?;
    let g_ref = with_fused(false, || -> candle_core::Result<Tensor> {
        let y = causal_attention_qkv(x2.as_tensor(), h, 0.3, key)?;
        Ok(grad_of(&weighted(&y, &wy)?, &x2))
    })?;
    assert_close("packed attention dqkv", &g, &g_ref, 1e-5);
    Ok(())
}

#[test]
fn fused_kernels_are_deterministic_across_thread_counts() -> R {
    let qkv = randn(&[2, 130, 3 * 32], 19);
    let run = |threads: usize| -> Vec<f32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let x = Var::from_tensor(&qkv).unwrap();
            let y = causal_attention_qkv(x.as_tensor(), 4, 0.25, Some(DropoutKey::new(1, 1, 0.1)))
                .unwrap();
            let ln = LayerNorm {
                weight: Tensor::ones(32, DType::F32, &DEV).unwrap(),
                bias: Tensor::zeros(32, DType::F32, &DEV).unwrap(),
                eps: 1e-5,
            };
            let y = candle_core::Module::forward(&ln, &y).unwrap();
            let g = grad_of(&y.sqr().unwrap().sum_all().unwrap(), &x);
            g.flatten_all().unwrap().to_vec1().unwrap()
        })
    };
    assert_eq!(run(1), run(3));
    Ok(())
}

#[test]
fn adamw_fused_matches_composed_and_sum_squares_matches_f64() -> R {
    let n = 100_003;
    let p = randn(&[n], 20);
    let g = (randn(&[n], 21) * 0.01)?;
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let (mut mt, mut vt) = (
        Tensor::zeros(n, DType::F32, &DEV)?,
        Tensor::zeros(n, DType::F32, &DEV)?,
    );
    let var = Var::from_tensor(&p)?;
    let mut pt = p.clone();
    for t in 1..=3 {
        let step = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            t,
            grad_scale: 0.7,
        };
        step.apply(var.as_tensor(), &g, &mut m, &mut v)?;
        (pt, mt, vt) = step.apply_composed(&pt, &g, &mt, &vt)?;
    }
    assert_close("adamw param", var.as_tensor(), &pt, 1e-6);
    assert_close("adamw m", &Tensor::from_slice(&m, n, &DEV)?, &mt, 1e-7);
    assert_close("adamw v", &Tensor::from_slice(&v, n, &DEV)?, &vt, 1e-9);
    let sq = sum_squares(&[g.clone(), p.clone()])?;
    let want: f64 = [&g, &p]
        .iter()
        .flat_map(|t| t.to_vec1::<f32>().unwrap())
        .map(|x| x as f64 * x as f64)
        .sum();
    assert!((sq - want).abs() / want < 1e-6, "{sq} vs {want}");
    // Tensors that are not f32 take the other devices' path (summed as tensors, read back
    // together); the sum is the same.
    let mixed = sum_squares(&[g.to_dtype(DType::F64)?, p.clone(), g.to_dtype(DType::F64)?])?;
    let want = want + sum_squares(std::slice::from_ref(&g))?;
    assert!((mixed - want).abs() / want < 1e-6, "{mixed} vs {want}");
    Ok(())
}

#[test]
fn causal_mask_hides_the_future_of_each_query() -> R {
    let inf = f32::NEG_INFINITY;
    // Two queries at absolute positions 1 and 2 over four keys.
    let m = cocomix_ops::causal_mask(2, 4, 1, &DEV)?.to_vec2::<f32>()?;
    assert_eq!(m, [[0.0, 0.0, inf, inf], [0.0, 0.0, 0.0, inf]]);
    Ok(())
}
