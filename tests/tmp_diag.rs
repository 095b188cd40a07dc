use anyhow::Context;
use anyhow::Result;
use rotvar::autograd::Tape;
use rotvar::backend::cpu::CpuBackend;
use rotvar::models::{InputSpec, Model};
use rotvar::nn::Forward;
use rotvar::ops;
use rotvar::rng::Rng;
use rotvar::tensor::Tensor;
#[test]
fn diag() -> Result<()> {
    let b = CpuBackend::shared();
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let model = Model::build("lenet", spec, &b, 42)?;
    let mut rng = Rng::new(113);
    let x = Tensor::from_vec(&b, &[3, 1, 28, 28], &(0..3 * 784).map(|_| rng.normal()).collect::<Vec<_>>())?;
    let labels = Tensor::from_vec(&b, &[3], &[3.0, 7.0, 0.0])?;
    let loss_of = || -> Result<Tensor> { ops::nll_loss(&model.forward(&x, &mut Forward::train(0))?, &labels) };
    let ce = || -> Result<f64> {
        let mut logits = None;
        {
            let mut obs = |name: &str, t: &Tensor| -> Result<()> {
                if name == "fc2" {
                    logits = Some(t.to_vec()?);
                }
                Ok(())
            };
            let mut f = Forward { train: true, seed: 0, observer: Some(&mut obs) };
            model.forward(&x, &mut f)?;
        }
        let l = logits.context("no fc2")?;
        let lab = [3usize, 7, 0];
        let mut s = 0.0f64;
        for r in 0..3 {
            let row = &l[r * 10..(r + 1) * 10];
            let mx = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
            s += lse - row[lab[r]] as f64;
        }
        Ok(s / 3.0)
    };
    let params = model.parameters();
    let tape = Tape::start()?;
    let loss = loss_of()?;
    let grads = tape.backward(&loss)?;
    println!("loss {}", loss.scalar()?);
    for p in &params {
        let ga = grads.get(&p.tensor).unwrap().to_vec()?;
        let mut data = p.tensor.to_vec()?;
        for &i in &[0usize, 1, 2, 3, 7, 11] {
            if i >= data.len() {
                continue;
            }
            let mut s = format!("{} [{i}] analytic {:.6e} fd:", p.name, ga[i]);
            for eps in [1e-2f32, 3e-3, 1e-3, 3e-4, 1e-4] {
                let orig = data[i];
                data[i] = orig + eps;
                p.tensor.copy_from_host(&data)?;
                let lp = ce()?;
                data[i] = orig - eps;
                p.tensor.copy_from_host(&data)?;
                let lm = ce()?;
                data[i] = orig;
                p.tensor.copy_from_host(&data)?;
                s += &format!(" {:.6e}", (lp - lm) / ((orig + eps) as f64 - (orig - eps) as f64));
            }
            println!("{s}");
        }
    }
    Ok(())
}
