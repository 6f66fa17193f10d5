//! Issue 13: the CLI refuses sizes the host or the adapter cannot hold with exit 2 and
//! one line (it aborted allocating them), refuses `sphere --classes 0` (it used 1), and
//! refuses a safetensors header that names a tensor twice (the last entry won and the
//! first was never checked).

use std::process::{Command, Output};

use margin_softmax::tensors::parse_inputs;
use margin_softmax::{sphere, Error, Problem, Shape};
use safetensors::{tensor::TensorView, Dtype};

mod common;

use common::{run_cli as run, run_loss, test_dir as dir};

/// The binary under `ulimit -v kib` (the shell sets the limit, then execs it).
fn run_under_memory_limit(kib: u64, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {kib} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_margin-softmax"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run margin-softmax under a memory limit")
}

/// Exit 2, one line on stderr, containing every needle.
fn assert_bad_input(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr:?}");
    for needle in needles {
        assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    }
}

#[test]
fn sphere_sizes_past_the_cap_exit_2() {
    let png = dir("size").join("map.png");
    for size in ["200000", "8193", "7", &usize::MAX.to_string()] {
        let out = run(&[
            "sphere",
            "--quiet",
            "--size",
            size,
            "--output",
            png.to_str().unwrap(),
        ]);
        assert_bad_input(&out, &["--size", "8 to 8192"]);
        assert!(!png.exists());
    }
}

#[test]
fn sphere_with_zero_or_too_many_classes_exits_2() {
    let png = dir("classes").join("map.png");
    let sphere = |classes: &str| {
        run(&[
            "sphere",
            "--quiet",
            "--size",
            "8",
            "--classes",
            classes,
            "--output",
            png.to_str().unwrap(),
        ])
    };
    assert_bad_input(&sphere("0"), &["--classes 0", "at least 1 class"]);
    let huge = (usize::MAX / 2).to_string();
    assert_bad_input(
        &sphere(&huge),
        &["--classes", "class vectors", "bytes in one buffer"],
    );
    assert!(!png.exists());
    // --classes only sizes the default class vectors: with --input it is refused.
    let out = run(&[
        "sphere",
        "--quiet",
        "--classes",
        "4",
        "--input",
        "w.safetensors",
        "--output",
        png.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_sizes_past_the_adapters_buffers_exit_2() {
    let out = run(&["check", "--quiet", "--batch", "2000000", "--dim", "4000"]);
    assert_bad_input(
        &out,
        &[
            "--batch 2000000 × --dim 4000",
            "features",
            "--batch or --dim",
        ],
    );
    let out = run(&[
        "check",
        "--quiet",
        "--batch",
        "1",
        "--dim",
        &usize::MAX.to_string(),
    ]);
    assert_bad_input(&out, &["features"]);
}

#[test]
fn check_past_the_host_memory_exits_2() {
    // x alone is 2e9 bytes, within the adapter's 2 GiB buffers but not within 2.5 GB of
    // address space (the driver takes about 1 GB of it).
    let out = run_under_memory_limit(
        2_500_000,
        &[
            "check",
            "--quiet",
            "--batch",
            "100000",
            "--dim",
            "5000",
            "--classes",
            "10",
        ],
    );
    assert_bad_input(&out, &["host memory", "--batch, --dim or --classes"]);
}

#[test]
fn the_fallible_constructors_report_host_memory() {
    for shape in [
        Shape::new(usize::MAX / 2, 4, 1),
        Shape::new(1, 1, usize::MAX),
        Shape::new(1 << 50, 1, 1),
    ] {
        assert!(
            matches!(Problem::try_random(shape, 1), Err(Error::HostMemory { .. })),
            "{shape:?}"
        );
    }
    let small = Problem::try_random(Shape::new(3, 4, 5), 9).expect("small");
    assert_eq!(small, Problem::random(Shape::new(3, 4, 5), 9));
    assert!(matches!(
        sphere::try_default_class_vectors(usize::MAX / 2),
        Err(Error::HostMemory { .. })
    ));
    assert_eq!(
        sphere::try_default_class_vectors(7).expect("7 classes"),
        sphere::default_class_vectors(7)
    );
    let message = Error::HostMemory {
        what: "x",
        bytes: 12,
    }
    .to_string();
    assert!(message.contains("cannot allocate 12 bytes of host memory for x"));
}

/// A valid file's bytes with `entry` spliced in as the first entry of its header, and
/// the tensor names that file uses.
fn with_extra_entry(entry: &str) -> Vec<u8> {
    let x: Vec<u8> = [0.5f32, -0.25, 1.0, 0.0, 1.0, 0.5]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let y: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "features".to_string(),
            TensorView::new(Dtype::F32, vec![2, 3], &x).expect("view"),
        ),
        (
            "weights".to_string(),
            TensorView::new(Dtype::F32, vec![2, 3], &x).expect("view"),
        ),
        (
            "labels".to_string(),
            TensorView::new(Dtype::I64, vec![2], &y).expect("view"),
        ),
    ];
    let bytes = safetensors::serialize(views, None).expect("serialize");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).expect("utf-8");
    let spliced = format!("{{{entry},{}", &header.trim_end()[1..]);
    let mut file = (spliced.len() as u64).to_le_bytes().to_vec();
    file.extend(spliced.as_bytes());
    file.extend(&bytes[8 + n..]);
    file
}

#[test]
fn a_tensor_named_twice_in_the_header_exits_2() {
    // The dropped entry claims F64 [99, 99] at offsets past the end of the file.
    let d = dir("duplicate");
    let input = d.join("in.safetensors");
    let output = d.join("out.safetensors");
    std::fs::write(
        &input,
        with_extra_entry(r#""weights":{"dtype":"F64","shape":[99,99],"data_offsets":[0,78408]}"#),
    )
    .expect("write");
    let out = run_loss(&input, &output);
    assert_bad_input(&out, &["tensor `weights`", "more than once"]);
    assert!(!output.exists());
    let png = d.join("map.png");
    let out = run(&[
        "sphere",
        "--quiet",
        "--size",
        "8",
        "--input",
        input.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
    ]);
    assert_bad_input(&out, &["tensor `weights`", "more than once"]);
}

#[test]
fn duplicate_keys_are_found_however_they_are_written() {
    let entry = r#"{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}"#;
    for (extra, name) in [
        // The same name spelled with escapes.
        (format!(r#""weigh\u0074s":{entry}"#), "`weights`"),
        (format!(r#""f\u0065atures" : {entry}"#), "`features`"),
        // Metadata twice.
        (
            r#""__metadata__":{"a":"b"},"__metadata__":{"c":"d"}"#.to_string(),
            "`__metadata__` appears more than once",
        ),
        // A name with a line break stays on one line.
        (
            format!(r#""a\nb":{entry},"a\nb":{entry}"#),
            "tensor `a\\nb`",
        ),
    ] {
        let err = parse_inputs(&with_extra_entry(&extra)).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(name), "{extra}: {message}");
        assert!(message.contains("more than once"), "{extra}: {message}");
        assert_eq!(message.lines().count(), 1, "{message:?}");
    }
    // Keys of nested objects, and names that are merely alike, are not duplicates.
    for extra in [
        r#""scale":{"dtype":"F32","shape":[],"data_offsets":[24,28]}"#,
        r#""__metadata__":{"dtype":"x","shape":"y","features":"z"}"#,
        r#""__metadata__":{"weights\"":"\\\"weights"}"#,
    ] {
        let err = parse_inputs(&with_extra_entry(extra));
        let message = err.map(|_| String::new()).unwrap_or_else(|e| e.to_string());
        assert!(!message.contains("more than once"), "{extra}: {message}");
    }
    // The file without a duplicate still loads.
    let ok = with_extra_entry(r#""__metadata__":{"format":"pt"}"#);
    assert!(parse_inputs(&ok).is_ok());
}

#[test]
fn the_readme_links_documents_that_exist() {
    // The README cited a docs/loss-spec.md that was not in the repository.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let mut targets: Vec<&str> = readme
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .filter(|t| !t.contains("://") && !t.starts_with('#'))
        .collect();
    // Paths quoted as code (`docs/….md`) are citations too.
    targets.extend(
        readme
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|t| t.starts_with("docs/") && t.ends_with(".md")),
    );
    assert!(
        targets.contains(&"docs/loss-spec.md"),
        "the README links the spec: {targets:?}"
    );
    for target in targets {
        let path = target.split('#').next().unwrap_or(target);
        assert!(
            root.join(path).is_file(),
            "README cites {target}, which is missing"
        );
    }
}

/// The issue's long rows: `check` passes its own check at D = 20 000 and 70 001, where it
/// used to fail.
#[test]
fn check_passes_on_long_feature_vectors() {
    for dim in ["20000", "70001"] {
        let out = run(&["check", "--batch", "2", "--dim", dim, "--classes", "3"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("PASS"),
            "D = {dim}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
