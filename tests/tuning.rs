//! The GEMM autotuner: it times each new bucket once, keeps the fastest candidate, and
//! persists its findings in the cache file that the next context reads; `Tuning::Off`
//! times nothing.

use margin_softmax::{Context, ContextOptions, LossParams, Pass, Plan, Problem, Shape, Tuning};

fn context_with(tuning: Tuning) -> Context {
    Context::new_blocking(ContextOptions {
        tuning,
        ..ContextOptions::default()
    })
    .expect("context")
}

#[test]
fn buckets_are_tuned_once_and_persist_in_the_cache_file() {
    let dir = std::env::temp_dir().join(format!("margin-softmax-tune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ctx = context_with(Tuning::CacheIn(dir.clone()));
    assert!(ctx.tuned().is_empty(), "a new cache starts empty");
    let shape = Shape::new(40, 24, 300);
    Plan::new(&ctx, shape).expect("plan");
    let tuned = ctx.tuned();
    // The chunked plan's three products, each in its bucket.
    for layout in ["dots", "feature_grad", "class_grad"] {
        assert!(
            tuned.iter().any(|t| t.bucket.layout == layout),
            "{layout}: {tuned:?}"
        );
    }
    assert_eq!(tuned.len(), 3, "{tuned:?}");
    for t in &tuned {
        assert_eq!(t.seconds.len(), ctx.gemm_candidates().len(), "{t:?}");
        let fastest = t
            .seconds
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("times");
        assert_eq!(t.candidate, fastest.0, "{t:?}");
        assert!(t.bucket.m.is_power_of_two() && t.bucket.n.is_power_of_two());
    }
    let file = ctx.tuning_file().expect("a cache file").to_path_buf();
    assert!(
        file.starts_with(&dir) && file.exists(),
        "{}",
        file.display()
    );
    // A second context on the same adapter reads the findings: nothing to time again.
    let again = context_with(Tuning::CacheIn(dir.clone()));
    assert_eq!(again.tuned(), tuned);
    // Whatever the tuner picked, the loss is the default candidate's, bit for bit.
    let p = Problem::random(shape, 9);
    let params = LossParams::default();
    let off = context_with(Tuning::Off);
    let a = again
        .loss_on(&p, &params, Pass::ForwardBackward)
        .expect("tuned");
    let b = off
        .loss_on(&p, &params, Pass::ForwardBackward)
        .expect("untuned");
    assert_eq!(a, b);
    assert!(off.tuned().is_empty(), "tuning off times nothing");
    // Where the default wins every bucket (llvmpipe) the comparison above runs one kernel
    // on both sides: a cache file that names a staged candidate for every bucket makes
    // the tuned side run it, and the bits must still agree.
    let staged: String = std::fs::read_to_string(&file)
        .expect("the cache file")
        .lines()
        .map(|line| {
            let mut fields: Vec<&str> = line.split('\t').collect();
            fields[4] = "staged-64";
            fields.join("\t") + "\n"
        })
        .collect();
    std::fs::write(&file, staged).expect("rewrite the cache file");
    let pinned_by_cache = context_with(Tuning::CacheIn(dir.clone()));
    assert!(
        pinned_by_cache
            .tuned()
            .iter()
            .all(|t| t.candidate == "staged-64"),
        "{:?}",
        pinned_by_cache.tuned()
    );
    let c = pinned_by_cache
        .loss_on(&p, &params, Pass::ForwardBackward)
        .expect("staged");
    assert_eq!(
        c, b,
        "a staged candidate chosen from the cache changes no bit"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_cache_file_is_ignored_not_fatal() {
    let dir = std::env::temp_dir().join(format!("margin-softmax-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ctx = context_with(Tuning::CacheIn(dir.clone()));
    let file = ctx.tuning_file().expect("file").to_path_buf();
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        &file,
        "dots\tnot a number\n\u{0}garbage\nfeature_grad\t1\t2\n",
    )
    .expect("write");
    let ctx = context_with(Tuning::CacheIn(dir.clone()));
    assert!(ctx.tuned().is_empty());
    Plan::new(&ctx, Shape::new(3, 8, 5)).expect("plan on a damaged cache");
    assert_eq!(ctx.tuned().len(), 3, "the three products of a small shape");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plan whose w is stored in 16 bits tunes its own buckets for the products that read
/// it in place (the dots and G·w, `dots_bf16` and `feature_grad_bf16`), read back from the
/// cache file by the next context; Gᵀ·x̂ reads f32 x̂ and shares the f32 bucket.
#[test]
fn sixteen_bit_layouts_are_buckets_of_their_own() {
    use margin_softmax::{ElementType, ElementTypes};
    let dir = std::env::temp_dir().join(format!("margin-softmax-tune16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ctx = context_with(Tuning::CacheIn(dir.clone()));
    let elements = ElementTypes::inputs(ElementType::F16, ElementType::Bf16);
    Plan::new(&ctx, Shape::new(40, 24, 300).with_elements(elements)).expect("plan");
    let mut layouts: Vec<&str> = ctx.tuned().iter().map(|t| t.bucket.layout).collect();
    layouts.sort_unstable();
    assert_eq!(layouts, ["class_grad", "dots_bf16", "feature_grad_bf16"]);
    let again = context_with(Tuning::CacheIn(dir.clone()));
    assert_eq!(again.tuned(), ctx.tuned());
    let _ = std::fs::remove_dir_all(&dir);
}
