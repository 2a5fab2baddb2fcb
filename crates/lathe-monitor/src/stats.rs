//! The statistics the monitor computes over a window: quantiles, the population stability
//! index of a categorical mix, and the Kolmogorov–Smirnov p-value. Pure functions.

/// The value at quantile `q` (nearest rank) of `values`, which are sorted here.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// PSI of an observed mix against an expected one (both shares summing to 1), shares
/// floored at 10⁻⁴ as the feature PSI does.
pub fn psi(observed: &[f64], expected: &[f64]) -> f64 {
    const FLOOR: f64 = 1e-4;
    observed
        .iter()
        .zip(expected)
        .map(|(&a, &e)| {
            let (a, e) = (a.max(FLOOR), e.max(FLOOR));
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// Shares of each class among `predicted` (class indices below `n_classes`).
pub fn shares(predicted: impl Iterator<Item = u32>, n_classes: usize) -> Vec<f64> {
    let mut counts = vec![0u64; n_classes];
    let mut total = 0u64;
    for c in predicted {
        if let Some(slot) = counts.get_mut(c as usize) {
            *slot += 1;
            total += 1;
        }
    }
    counts
        .iter()
        .map(|&c| {
            if total == 0 {
                0.0
            } else {
                c as f64 / total as f64
            }
        })
        .collect()
}

/// The asymptotic p-value of a two-sample Kolmogorov–Smirnov statistic `d` for samples of
/// `n` and `m` values (Stephens' correction; the series of the Kolmogorov distribution).
pub fn ks_p_value(d: f64, n: u64, m: u64) -> f64 {
    if n == 0 || m == 0 {
        return 1.0;
    }
    let ne = (n as f64 * m as f64) / (n as f64 + m as f64);
    let sq = ne.sqrt();
    let lambda = (sq + 0.12 + 0.11 / sq) * d;
    if lambda < 1e-3 {
        return 1.0;
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let k = k as f64;
        let term = (-2.0 * k * k * lambda * lambda).exp();
        sum += if (k as i64) % 2 == 1 { term } else { -term };
        if term < 1e-12 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_shares() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), 51.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(
            shares([0, 1, 1, 3, 9].into_iter(), 4),
            vec![0.25, 0.5, 0.0, 0.25]
        );
    }

    #[test]
    fn psi_is_zero_for_the_same_mix_and_grows_with_shift() {
        let e = [0.25, 0.25, 0.25, 0.25];
        assert!(psi(&e, &e).abs() < 1e-12);
        let mild = psi(&[0.3, 0.25, 0.25, 0.2], &e);
        let strong = psi(&[0.7, 0.1, 0.1, 0.1], &e);
        assert!(mild < 0.1 && strong > 0.2, "{mild} {strong}");
    }

    #[test]
    fn ks_p_values_match_the_kolmogorov_distribution() {
        // λ = 1.36 is the 5 % point of the Kolmogorov distribution.
        let n = 1_000_000;
        let d = 1.36 / ((n as f64 / 2.0).sqrt());
        let p = ks_p_value(d, n, n);
        assert!((p - 0.05).abs() < 0.003, "{p}");
        assert!(ks_p_value(0.01, 50, 50) > 0.99);
        assert!(ks_p_value(0.6, 50, 1000) < 1e-6);
    }
}
