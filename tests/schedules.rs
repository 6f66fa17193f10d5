//! Per-row margin schedules: ElasticFace's draws are reproducible from (seed, step,
//! row), follow N(m, σ), sort as its "+" variant says, and run through the kernels
//! within the reference's bounds.

mod common;

use margin_softmax::reference;
use margin_softmax::schedule::{ElasticFace, ElasticKind};
use margin_softmax::{Algorithm, HostInputs, LossOutput, Pass, Problem, Shape, IGNORE};

#[test]
fn draws_repeat_for_a_seed_and_step_and_change_with_either() {
    let e = ElasticFace::arc();
    let a = e.margins(7, 64);
    assert_eq!(a, e.margins(7, 64), "the same seed and step");
    assert_ne!(a, e.margins(8, 64), "another step");
    let other = ElasticFace { seed: 1, ..e };
    assert_ne!(a, other.margins(7, 64), "another seed");
    // Counter-based: row i's margin does not depend on how many rows are drawn.
    assert_eq!(&e.margins(7, 200)[..64], &a[..]);
    assert!(a.iter().all(|m| m[1] == 0.0), "Arc sets m2 only");
    assert!(ElasticFace::cos().margins(7, 8).iter().all(|m| m[0] == 0.0));
}

#[test]
fn draws_follow_their_normal_distribution() {
    for e in [
        ElasticFace::arc(),
        ElasticFace::cos(),
        ElasticFace::arc_plus(),
    ] {
        let n = 40_000;
        let draws: Vec<f64> = (0..n).map(|k| f64::from(e.draw(3, k))).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let (m, s) = (f64::from(e.mean), f64::from(e.std));
        // 5 standard errors of the mean; the sample std within 2% (its standard error
        // is σ/√(2n), 0.35%: 2% is under 6 of them), the share beyond 2σ within 6 of its 0.1%.
        assert!(
            (mean - m).abs() < 5.0 * s / (n as f64).sqrt(),
            "{e:?}: mean {mean}"
        );
        assert!(
            (var.sqrt() / s - 1.0).abs() < 0.02,
            "{e:?}: std {}",
            var.sqrt()
        );
        let beyond_two = draws.iter().filter(|d| (*d - m).abs() > 2.0 * s).count();
        let share = beyond_two as f64 / n as f64;
        assert!((share - 0.0455).abs() < 0.006, "{e:?}: {share} beyond 2σ");
    }
}

#[test]
fn plus_gives_the_smallest_margins_to_the_largest_target_cosines() {
    let e = ElasticFace::cos_plus();
    let labels = [3, IGNORE, 0, 2, 1, 4];
    let target_cos = [0.1, 0.9, 0.7, -0.2, 0.7, 0.3];
    let m = e.plus_margins(5, &labels, &target_cos);
    let mut draws: Vec<f32> = (0..5).map(|k| e.draw(5, k)).collect();
    draws.sort_by(f32::total_cmp);
    // Descending target cosine: rows 2 and 4 (0.7, in row order), 5, 0, 3.
    let order = [2, 4, 5, 0, 3];
    for (k, &row) in order.iter().enumerate() {
        assert_eq!(m[row], [0.0, draws[k]], "row {row}");
    }
    assert_eq!(m[1], [0.0, e.mean], "the ignored row");
    assert_eq!(e.kind, ElasticKind::Cos);
}

/// ElasticArcFace and ElasticCosFace+ through the kernels, on the chunked and the
/// memory-minimal plans, against the reference with the same margins; "+" from the
/// target cosines of the step's own forward.
#[test]
fn elastic_margins_run_within_the_reference_bounds() {
    let ctx = common::context();
    let mut p = Problem::random(Shape::new(24, 20, 37), 13);
    p.labels[5] = IGNORE;
    let inputs = HostInputs::new(p.shape, &p.features, &p.classes, &p.labels);
    for e in [ElasticFace::arc(), ElasticFace::cos_plus()] {
        let params = e.params();
        let margins = if e.plus {
            let forward: LossOutput = ctx
                .loss_inputs(&inputs, &params, Pass::Forward, None)
                .expect("forward");
            e.plus_margins(2, &p.labels, &forward.target_cos)
        } else {
            e.margins(2, p.shape.batch)
        };
        let with = inputs.with_row_margins(&margins);
        let expected = reference::loss_inputs(&with, &params).expect("reference");
        for algorithm in [Algorithm::Chunked, Algorithm::MemoryMinimal] {
            let out: LossOutput = ctx
                .loss_inputs(&with, &params, Pass::ForwardBackward, Some(algorithm))
                .expect("loss");
            let check = reference::compare(20, &params, &out, &expected);
            assert!(check.passes(), "{e:?} {algorithm:?}: {check:?}");
        }
    }
}
