//! The real `margin-softmax` binary: a safetensors round trip, every bad-input case with
//! its exit code and message, `check`, `adapters` and `--help`.

use std::path::Path;

use margin_softmax::{reference, ElementType, LossParams, Problem, Reduction, Shape, IGNORE};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

mod common;

use common::{run_cli as run, run_loss, test_dir as dir};

/// One tensor for a test file: name, dtype, shape, bytes.
type Entry = (&'static str, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensors of a valid input file for `p`, labels as i64 with -1 for IGNORE.
fn entries(p: &Problem) -> Vec<Entry> {
    let Shape {
        batch: b,
        dim: d,
        classes: c,
        ..
    } = p.shape;
    let labels: Vec<u8> = p
        .labels
        .iter()
        .flat_map(|&l| if l == IGNORE { -1i64 } else { i64::from(l) }.to_le_bytes())
        .collect();
    vec![
        ("features", Dtype::F32, vec![b, d], f32_bytes(&p.features)),
        ("weights", Dtype::F32, vec![c, d], f32_bytes(&p.classes)),
        ("labels", Dtype::I64, vec![b], labels),
    ]
}

fn write(path: &Path, entries: &[Entry]) {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(n, t, s, d)| {
            (
                n.to_string(),
                TensorView::new(*t, s.clone(), d).expect("view"),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(path, bytes).expect("write input");
}

fn problem() -> Problem {
    let mut p = Problem::random(Shape::new(23, 13, 57), 77);
    p.labels[3] = IGNORE;
    p
}

fn read_f32(file: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = file
        .tensor(name)
        .unwrap_or_else(|_| panic!("output lacks {name}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

#[test]
fn loss_round_trip_through_safetensors() {
    let d = dir("round-trip");
    let p = problem();
    let input = d.join("in.safetensors");
    let output = d.join("out.safetensors");
    let mut tensors = entries(&p);
    tensors.push(("scale", Dtype::F32, vec![], f32_bytes(&[20.0])));
    write(&input, &tensors);
    let out = run(&[
        "loss",
        "--quiet",
        "--verify",
        "--margin",
        "0.3",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "adapter",
        "loss",
        "accuracy",
        "margin",
        "time",
        "grad_features",
    ] {
        assert!(stdout.contains(needle), "summary lacks {needle}: {stdout}");
    }

    let bytes = std::fs::read(&output).expect("output written");
    let file = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let params = LossParams {
        scale: 20.0,
        margin: 0.3,
        ..LossParams::default()
    };
    let expected = reference::loss_on(&p, &params).expect("reference");
    let (shape, loss) = read_f32(&file, "loss");
    assert!(shape.is_empty());
    assert!((f64::from(loss[0]) - expected.loss).abs() / expected.loss < 1e-5);
    let (shape, gx) = read_f32(&file, "grad_features");
    assert_eq!(shape, vec![23, 13]);
    assert!(
        reference::max_rel_error(
            &gx,
            &expected.grad_features,
            expected.grad_features_magnitude
        ) < 1e-4
    );
    let (shape, gw) = read_f32(&file, "grad_weights");
    assert_eq!(shape, vec![57, 13]);
    assert!(
        reference::max_rel_error(&gw, &expected.grad_classes, expected.grad_classes_magnitude)
            < 1e-4
    );
    let (_, gs) = read_f32(&file, "grad_scale");
    assert!((f64::from(gs[0]) - expected.grad_scale).abs() < 1e-4);
    for name in ["per_sample_loss", "target_cos", "best_other_cos"] {
        assert_eq!(read_f32(&file, name).0, vec![23], "{name}");
    }
    let pred = file.tensor("pred").expect("pred");
    assert_eq!((pred.dtype(), pred.shape()), (Dtype::I64, &[23usize][..]));
}

#[test]
fn i32_labels_and_per_row_losses() {
    let d = dir("i32");
    let p = problem();
    let mut tensors = entries(&p);
    tensors[2] = (
        "labels",
        Dtype::I32,
        vec![23],
        p.labels
            .iter()
            .flat_map(|&l| if l == IGNORE { -1i32 } else { l as i32 }.to_le_bytes())
            .collect(),
    );
    let input = d.join("in.safetensors");
    let output = d.join("out.safetensors");
    write(&input, &tensors);
    let out = run(&[
        "loss",
        "--quiet",
        "--reduction",
        "none",
        "--scale",
        "16",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&output).expect("output");
    let file = SafeTensors::deserialize(&bytes).expect("valid");
    let (shape, loss) = read_f32(&file, "loss");
    assert_eq!(shape, vec![23]);
    let params = LossParams {
        scale: 16.0,
        reduction: Reduction::None,
        ..LossParams::default()
    };
    let expected = reference::loss_on(&p, &params).expect("reference");
    assert!(reference::max_rel_error(&loss, &expected.row_loss, 0.0) < 1e-4);
    assert_eq!(loss[3], 0.0, "the ignored row");
}

/// Runs `loss` on `entries` (or on raw `bytes`) and asserts exit 2, a message naming
/// `needle`, and no output file.
fn assert_bad_input(name: &str, file: Result<Vec<Entry>, Vec<u8>>, needle: &str) {
    let d = dir(name);
    let input = d.join("in.safetensors");
    let output = d.join("out.safetensors");
    match file {
        Ok(entries) => write(&input, &entries),
        Err(bytes) => std::fs::write(&input, bytes).expect("write"),
    }
    let out = run_loss(&input, &output);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{name}: message {stderr:?} lacks {needle:?}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{name}: one line: {stderr:?}"
    );
    assert!(!output.exists(), "{name}: output written despite the error");
}

#[test]
fn every_bad_input_is_exit_2_naming_the_tensor() {
    let p = problem();
    let with = |edit: &dyn Fn(&mut Vec<Entry>)| {
        let mut e = entries(&p);
        edit(&mut e);
        Ok(e)
    };
    assert_bad_input(
        "missing",
        with(&|e| {
            e.remove(1);
        }),
        "`weights`: missing",
    );
    assert_bad_input(
        "misnamed",
        with(&|e| e[0].0 = "feature"),
        "`features`: missing",
    );
    assert_bad_input(
        "dtype",
        with(&|e| {
            e[0].1 = Dtype::F64;
            e[0].2 = vec![23, 13];
            e[0].3 = p
                .features
                .iter()
                .flat_map(|&v| f64::from(v).to_le_bytes())
                .collect();
        }),
        "`features`: expected dtype F32, F16 or BF16, found F64",
    );
    assert_bad_input(
        "rank",
        with(&|e| e[2].2 = vec![23, 1]),
        "`labels`: expected B labels (rank 1)",
    );
    assert_bad_input(
        "length",
        with(&|e| {
            e[2].2 = vec![22];
            e[2].3.truncate(22 * 8);
        }),
        "`labels`: expected 23 labels",
    );
    assert_bad_input(
        "columns",
        with(&|e| {
            e[1].2 = vec![57 * 13 / 19, 19];
        }),
        "`weights`: expected 13 columns",
    );
    assert_bad_input(
        "label",
        with(&|e| e[2].3[..8].copy_from_slice(&57i64.to_le_bytes())),
        "`labels`: row 0 has label 57",
    );
    assert_bad_input(
        "nan",
        with(&|e| e[1].3[40..44].copy_from_slice(&f32::NAN.to_le_bytes())),
        "`weights`: element 10 is NaN",
    );
    assert_bad_input(
        "label dtype",
        with(&|e| e[2].1 = Dtype::F64),
        "`labels`: expected dtype i64 or i32",
    );
    let mut truncated = std::fs::read({
        let d = dir("source");
        let path = d.join("ok.safetensors");
        write(&path, &entries(&p));
        path
    })
    .expect("read");
    truncated.truncate(truncated.len() - 100);
    assert_bad_input(
        "truncated",
        Err(truncated),
        "not a readable safetensors file",
    );
    assert_bad_input(
        "garbage",
        Err(b"not a tensor file".to_vec()),
        "not a readable safetensors file",
    );

    let out = run_loss(
        std::path::Path::new("/nonexistent/in.safetensors"),
        std::path::Path::new("/tmp/never.safetensors"),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/in.safetensors")
    );
}

#[test]
fn check_passes_on_this_adapter() {
    let out = run(&[
        "check",
        "--quiet",
        "--batch",
        "37",
        "--dim",
        "20",
        "--classes",
        "301",
        "--seed",
        "5",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("PASS") && stdout.contains("grad_classes") && !stdout.contains("FAIL"),
        "{stdout}"
    );
    let bad = run(&["check", "--quiet", "--classes", "0"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn adapters_and_help() {
    let out = run(&["adapters"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("timestamps"));
    for sub in ["loss", "check", "adapters", "bench"] {
        let out = run(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("--adapter"),
            "{sub} --help lists --adapter"
        );
    }
}

#[test]
fn sphere_renders_class_vectors_from_a_file() {
    let d = dir("sphere");
    let input = d.join("w.safetensors");
    let output = d.join("map.png");
    let w: Vec<f32> = vec![
        1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, -1.0, -1.0, -1.0,
    ];
    write(
        &input,
        &[("weights", Dtype::F32, vec![4, 3], f32_bytes(&w))],
    );
    let out = run(&[
        "sphere",
        "--quiet",
        "--size",
        "32",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&std::fs::read(&output).expect("png")[1..4], b"PNG");
    write(
        &input,
        &[("weights", Dtype::F32, vec![3, 4], f32_bytes(&w))],
    );
    let bad = run(&[
        "sphere",
        "--quiet",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`weights`"));
}

/// The safetensors dtype of a storage type.
fn dtype_of(t: ElementType) -> Dtype {
    match t {
        ElementType::F32 => Dtype::F32,
        ElementType::F16 => Dtype::F16,
        ElementType::Bf16 => Dtype::BF16,
    }
}

/// A small off-grid problem (B = 7, D = 13, C = 29, a row ignored) with features and
/// weights stored as `t`.
fn typed_entries(t: ElementType) -> Vec<Entry> {
    let mut p = Problem::random(Shape::new(7, 13, 29), 11);
    p.labels[2] = IGNORE;
    let mut e = entries(&p);
    for (entry, values) in e.iter_mut().zip([&p.features, &p.classes]) {
        entry.1 = dtype_of(t);
        entry.3 = t.stored_bytes(values);
    }
    e
}

/// Runs `loss --verify` with `extra` flags on `entries` and returns the output file's
/// bytes, asserting exit 0.
fn verified_run(name: &str, entries: &[Entry], extra: &[&str]) -> Vec<u8> {
    let d = dir(name);
    let input = d.join("in.safetensors");
    let output = d.join("out.safetensors");
    write(&input, entries);
    let mut args = vec![
        "loss",
        "--quiet",
        "--verify",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend(extra);
    let out = run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAIL"), "{name}: {stdout}");
    std::fs::read(&output).expect("output written")
}

/// The dtype and shape of tensor `name` of a safetensors file.
fn dtype_and_shape(bytes: &[u8], name: &str) -> (Dtype, Vec<usize>) {
    let file = SafeTensors::deserialize(bytes).expect("valid safetensors");
    let t = file
        .tensor(name)
        .unwrap_or_else(|_| panic!("output lacks {name}"));
    (t.dtype(), t.shape().to_vec())
}

#[test]
fn sixteen_bit_inputs_verify_and_write_gradients_in_their_dtype() {
    for (t, dtype) in [
        (ElementType::F16, Dtype::F16),
        (ElementType::Bf16, Dtype::BF16),
    ] {
        let name = format!("half-{}", t.name());
        let bytes = verified_run(&name, &typed_entries(t), &[]);
        assert_eq!(
            dtype_and_shape(&bytes, "grad_features"),
            (dtype, vec![7, 13]),
            "{name}"
        );
        assert_eq!(
            dtype_and_shape(&bytes, "grad_weights"),
            (dtype, vec![29, 13]),
            "{name}"
        );
        assert_eq!(
            dtype_and_shape(&bytes, "loss"),
            (Dtype::F32, vec![]),
            "{name}"
        );
        // With a loss scale of 1024 the gradients are 1024 times as large: --verify
        // divides them by it, and passes.
        let scaled = verified_run(
            &format!("{name}-scaled"),
            &typed_entries(t),
            &["--loss-scale", "1024", "--reduction", "sum"],
        );
        assert_eq!(dtype_and_shape(&scaled, "grad_weights").0, dtype, "{name}");
    }
}

#[test]
fn f32_grads_and_mixed_input_dtypes() {
    let bytes = verified_run(
        "f32-grads",
        &typed_entries(ElementType::F16),
        &["--f32-grads"],
    );
    assert_eq!(
        dtype_and_shape(&bytes, "grad_features"),
        (Dtype::F32, vec![7, 13])
    );
    assert_eq!(
        dtype_and_shape(&bytes, "grad_weights"),
        (Dtype::F32, vec![29, 13])
    );
    // BF16 features with F32 weights: each gradient in the dtype of its input.
    let mut mixed = typed_entries(ElementType::Bf16);
    let f32_weights = typed_entries(ElementType::F32).remove(1);
    mixed[1] = f32_weights;
    let bytes = verified_run("mixed", &mixed, &[]);
    assert_eq!(dtype_and_shape(&bytes, "grad_features").0, Dtype::BF16);
    assert_eq!(dtype_and_shape(&bytes, "grad_weights").0, Dtype::F32);
}

#[test]
fn sixteen_bit_errors_name_the_tensor() {
    let d = dir("half-errors");
    let input = d.join("in.safetensors");
    let output = d.join("out.safetensors");
    // A non-finite F16 weight is bad input naming the tensor.
    let mut e = typed_entries(ElementType::F16);
    e[1].3[6..8].copy_from_slice(&0x7c00u16.to_le_bytes());
    write(&input, &e);
    let out = run_loss(&input, &output);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`weights`: element 3 is inf"), "{stderr}");
    // A gradient past F16's range (a summed loss scaled by 1e9): exit 1, one line naming
    // the output tensor, and no output file.
    write(&input, &typed_entries(ElementType::F16));
    let out = run(&[
        "loss",
        "--quiet",
        "--reduction",
        "sum",
        "--loss-scale",
        "1e9",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.contains("tensor `grad_features`") || stderr.contains("tensor `grad_weights`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("F16") && stderr.contains("--loss-scale"),
        "{stderr}"
    );
    assert!(!output.exists(), "output written despite the error");
    // A bad loss scale is bad input.
    let out = run(&[
        "loss",
        "--quiet",
        "--loss-scale",
        "0",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("loss_scale"), "{stderr}");
}

/// A `row_margins` tensor (B×2 f32) gives each row its own (m2_i, m3_i): `--verify`
/// passes against the reference with the same margins on F32 and BF16 inputs, the loss
/// differs from the run without them, and a tensor of the wrong shape or out of range is
/// exit 2 naming it.
#[test]
fn row_margins_from_the_file() {
    let mut e = typed_entries(ElementType::F32);
    let without = verified_run("row_margins_none", &e, &[]);
    let margins: Vec<f32> = (0..7)
        .flat_map(|i| [0.1 * (i % 3) as f32, 0.05 * i as f32])
        .collect();
    e.push(("row_margins", Dtype::F32, vec![7, 2], f32_bytes(&margins)));
    let with = verified_run("row_margins_f32", &e, &[]);
    let loss = |bytes: &[u8]| read_f32(&SafeTensors::deserialize(bytes).unwrap(), "loss").1;
    assert_ne!(loss(&with), loss(&without), "the margins change the loss");
    let mut bf16 = typed_entries(ElementType::Bf16);
    bf16.push(e[3].clone());
    verified_run("row_margins_bf16", &bf16, &[]);
    let mut wrong_shape = e.clone();
    wrong_shape[3].2 = vec![14];
    assert_bad_input("row_margins_shape", Ok(wrong_shape), "row_margins");
    let mut out_of_range = e.clone();
    out_of_range[3].3 = f32_bytes(&[[4.0f32, 0.0]; 7].concat());
    assert_bad_input("row_margins_range", Ok(out_of_range), "row_margins");
}

/// `--elastic` draws ElasticFace's per-row margins from `--seed` and `--step`: `--verify`
/// passes for each kind (the "+" ones from a forward pass's target cosines), the same
/// seed and step give the same loss, another step another, and `--elastic`, `--adaface`,
/// `--magface` or `--curricular` beside a `row_margins` tensor is exit 2.
#[test]
fn elastic_margins_from_the_flags() {
    let e = typed_entries(ElementType::F32);
    let loss = |bytes: &[u8]| read_f32(&SafeTensors::deserialize(bytes).unwrap(), "loss").1;
    for kind in ["arc", "cos", "arc-plus", "cos-plus"] {
        let a = verified_run(
            "elastic",
            &e,
            &["--elastic", kind, "--seed", "3", "--step", "4"],
        );
        let b = verified_run(
            "elastic",
            &e,
            &["--elastic", kind, "--seed", "3", "--step", "4"],
        );
        let c = verified_run(
            "elastic",
            &e,
            &["--elastic", kind, "--seed", "3", "--step", "5"],
        );
        assert_eq!(loss(&a), loss(&b), "{kind}: the same draws");
        assert_ne!(loss(&a), loss(&c), "{kind}: another step");
    }
    // Every schedule flag beside the file's row_margins is exit 2 naming them.
    let d = dir("schedule_and_tensor");
    let input = d.join("in.safetensors");
    let mut both = e.clone();
    both.push(("row_margins", Dtype::F32, vec![7, 2], f32_bytes(&[0.1; 14])));
    write(&input, &both);
    let output = d.join("out.safetensors");
    for flags in [
        &["--elastic", "arc"][..],
        &["--adaface"],
        &["--magface"],
        &["--curricular"],
    ] {
        let mut args = vec!["loss", "--quiet"];
        args.extend(flags);
        args.extend(["--input", input.to_str().unwrap()]);
        args.extend(["--output", output.to_str().unwrap()]);
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains("row_margins"), "{flags:?}: {stderr}");
    }
}

/// `--adaface` takes AdaFace's margins from the features' norms and `--adaface-state`:
/// the first run starts from μ = 20, σ = 100 and writes the state the library computes;
/// the next run reads it and moves on; `--verify` passes on both. `--magface` passes
/// `--verify` with F32 gradients whatever the inputs; `--curricular` keeps t in
/// `--curricular-state` as the library does. `--easy-margin` and
/// `--interclass-filter` change the loss and pass `--verify`.
#[test]
fn adaface_state_and_margin_options_from_the_flags() {
    use margin_softmax::schedule::{AdaFace, AdaFaceState, CurricularFace, CurricularState};
    let e = typed_entries(ElementType::F32);
    let p = {
        let mut p = Problem::random(Shape::new(7, 13, 29), 11);
        p.labels[2] = IGNORE;
        p
    };
    let state_dir = dir("adaface_state");
    let state_file = state_dir.join("adaface.state");
    let state_arg = state_file.to_str().unwrap();
    let loss = |bytes: &[u8]| read_f32(&SafeTensors::deserialize(bytes).unwrap(), "loss").1;
    let flags = ["--adaface", "--adaface-state", state_arg, "--scale", "64"];
    let first = verified_run("adaface_1", &e, &flags);
    let mut state = AdaFaceState::default();
    AdaFace::default()
        .margins(&mut state, &p.features, 13)
        .expect("margins");
    let saved = std::fs::read(&state_file).expect("state written");
    assert_eq!(
        saved,
        state.to_bytes(),
        "the library's state after one batch"
    );
    let second = verified_run("adaface_2", &e, &flags);
    AdaFace::default()
        .margins(&mut state, &p.features, 13)
        .expect("margins");
    // Two steps' state: the second run read the first's. (Its loss barely moves: near
    // θ = π/2, AdaFace's angular and cosine margins cancel to first order.)
    assert_eq!(std::fs::read(&state_file).unwrap(), state.to_bytes());
    assert!(loss(&first)[0].is_finite() && loss(&second)[0].is_finite());
    // MagFace: the margins from the norms, the regulariser and the radial part, F32
    // gradients from BF16 inputs too.
    let magface = verified_run("magface", &e, &["--magface", "--scale", "64"]);
    let bf16 = verified_run(
        "magface_bf16",
        &typed_entries(ElementType::Bf16),
        &["--magface"],
    );
    assert_eq!(dtype_and_shape(&bf16, "grad_features").0, Dtype::F32);
    assert!(loss(&magface)[0] > 0.0);
    // CurricularFace: t from 0, then from the state the first run wrote (the library's).
    let t_file = state_dir.join("curricular.state");
    let t_arg = t_file.to_str().unwrap();
    let flags = ["--curricular", "--curricular-state", t_arg, "--scale", "64"];
    verified_run("curricular_1", &e, &flags);
    let mut t = CurricularState::default();
    let labels = p.labels.clone();
    let inputs = margin_softmax::HostInputs::new(p.shape, &p.features, &p.classes, &labels);
    CurricularFace::default()
        .step(&mut t, &inputs)
        .expect("step");
    assert_eq!(std::fs::read(&t_file).unwrap(), t.to_bytes());
    verified_run("curricular_2", &e, &flags);
    CurricularFace::default()
        .step(&mut t, &inputs)
        .expect("step");
    assert_eq!(std::fs::read(&t_file).unwrap(), t.to_bytes());
    let arc = ["--margin", "0", "--angular-margin", "0.5"];
    let plain = verified_run("options_plain", &e, &arc);
    for extra in [&["--easy-margin"][..], &["--interclass-filter", "0.2"]] {
        let args: Vec<&str> = arc.iter().chain(extra).copied().collect();
        let with = verified_run("options", &e, &args);
        assert_ne!(loss(&with), loss(&plain), "{extra:?} changes the loss");
    }
}
