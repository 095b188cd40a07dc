//! The variance measure straight from its definition, on a materialized A: the slow, obviously
//! correct version that the streaming path is tested against. Memory is O(n·m·units), so this
//! is for tests and small checks only.

use super::{normalized, LayerVariance, VarianceStats};
use anyhow::{bail, Result};

/// Unbiased standard deviation by the two-pass formula (mean first, then squared deviations);
/// 0 for fewer than two values and, exactly, for values that are all equal (where the rounded
/// mean could otherwise leave a residue of a few ulps).
pub fn std_two_pass(x: &[f64]) -> f64 {
    if x.len() < 2 || x.iter().all(|&v| v == x[0]) {
        return 0.0;
    }
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    let ss: f64 = x.iter().map(|&v| (v - mean) * (v - mean)).sum();
    (ss / (x.len() - 1) as f64).sqrt()
}

/// V_t, V_x and V over the samples `rows` of `a` ([n][m][units]).
fn stats(a: &[f64], rows: &[usize], m: usize, units: usize) -> VarianceStats {
    let val = |i: usize, j: usize, u: usize| a[(i * m + j) * units + u];
    let count = rows.len() as f64;
    let vt = (0..units)
        .map(|u| {
            rows.iter().map(|&i| std_two_pass(&(0..m).map(|j| val(i, j, u)).collect::<Vec<_>>())).sum::<f64>() / count
        })
        .collect();
    let vx = (0..units)
        .map(|u| {
            (0..m).map(|j| std_two_pass(&rows.iter().map(|&i| val(i, j, u)).collect::<Vec<_>>())).sum::<f64>()
                / m as f64
        })
        .collect();
    let mut s = VarianceStats { vt, vx, v: Vec::new() };
    s.v = s.vt.iter().zip(&s.vx).map(|(&t, &x)| normalized(t, x)).collect();
    s
}

/// The measure of one layer whose activations are materialized: `a[(i·m + j)·units + u]` is
/// unit u of sample i rotated by rotation j, `labels[i] < classes`. The result has
/// `unit_shape = [units]` and `map_size = 1` (A already holds one value per unit).
pub fn reference<T: Copy + Into<f64>>(
    name: &str,
    a: &[T],
    n: usize,
    m: usize,
    units: usize,
    labels: &[u32],
    classes: usize,
) -> Result<LayerVariance> {
    if a.len() != n * m * units || labels.len() != n {
        bail!("reference: A has {} values and {} labels for n={n}, m={m}, units={units}", a.len(), labels.len());
    }
    if n == 0 || m == 0 || units == 0 {
        bail!("reference: n, m and units must be at least 1");
    }
    if let Some(&l) = labels.iter().find(|&&l| l as usize >= classes) {
        bail!("reference: label {l} out of range for {classes} classes");
    }
    let a: Vec<f64> = a.iter().map(|&v| v.into()).collect();
    let members: Vec<Vec<usize>> =
        (0..classes).map(|k| (0..n).filter(|&i| labels[i] as usize == k).collect()).collect();
    let class_stats: Vec<VarianceStats> = members
        .iter()
        .map(|rows| if rows.is_empty() { VarianceStats::undefined(units) } else { stats(&a, rows, m, units) })
        .collect();
    let all = stats(&a, &(0..n).collect::<Vec<_>>(), m, units);
    let present: Vec<usize> = (0..classes).filter(|&k| !members[k].is_empty()).collect();
    let stratified =
        (0..units).map(|u| present.iter().map(|&k| class_stats[k].v[u]).sum::<f64>() / present.len() as f64).collect();
    Ok(LayerVariance {
        name: name.to_string(),
        unit_shape: vec![units],
        map_size: 1,
        reduce: None,
        rotations: m,
        class_counts: members.iter().map(|r| r.len() as u64).collect(),
        classes: class_stats,
        all,
        stratified,
    })
}
