//! The GEMM autotuner. The first time a context meets a product layout and a shape
//! bucket (m, n and k rounded up to powers of two), it times every candidate the adapter
//! allows on a bounded slice of the product and keeps the fastest, in memory and in a
//! cache file keyed by the adapter (vendor, device id, driver) and the crate's version.
//! Every candidate gives the same bits (`shaders/gemm.wgsl`), so the choice changes
//! speed only.
//!
//! The slice is at most 256 × 512 × 1024 (0.27 GFLOP), timed with GPU timestamps where
//! the adapter has them (a GPU runs it in less time than a submit and wait take): one
//! warm-up and three timed runs of each of four candidates, 16 runs. On lavapipe
//! (`margin-softmax tune`) a run takes 2–9 ms for the register kernel and 5–43 ms for the
//! staged ones: at most about 0.4 s of timing per bucket. A candidate that fails to run is left out; where none runs, the default
//! serves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use wgpu::util::DeviceExt;

use crate::context::{Context, Tuning};
use crate::error::Result;
use crate::io::ElementType;
use crate::kernels::{encode, fold_grid, Dispatch, GemmLayout, GemmShape};
use crate::timing::{time_recording, Record, TimestampQueries};

/// The largest slice of a product the tuner times: rows, columns and k.
const SLICE: (u32, u32, u32) = (256, 512, 1024);
/// Timed runs per candidate, after one warm-up; the median counts.
const RUNS: usize = 3;

/// A bucket's slice of a product on the device: its shape (and the uniform holding it),
/// both operands and the product.
struct TuningSlice {
    gemm: GemmShape,
    uniform: wgpu::Buffer,
    lhs: wgpu::Buffer,
    rhs: wgpu::Buffer,
    product: wgpu::Buffer,
}

/// A product layout and shape bucket: m, n and k rounded up to powers of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bucket {
    /// Which product of the loss.
    pub layout: &'static str,
    /// Rows of the product, rounded up to a power of two.
    pub m: u32,
    /// Columns of the product, rounded up to a power of two.
    pub n: u32,
    /// Length of the dot products, rounded up to a power of two.
    pub k: u32,
}

impl Bucket {
    pub(crate) fn of(layout: GemmLayout, rhs: ElementType, m: u32, n: u32, k: u32) -> Bucket {
        let up = |v: u32| v.max(1).checked_next_power_of_two().unwrap_or(1 << 31);
        Bucket {
            layout: layout.key(rhs),
            m: up(m),
            n: up(n),
            k: up(k),
        }
    }
}

/// The tuner's finding for one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuned {
    /// The bucket.
    pub bucket: Bucket,
    /// The fastest candidate's name.
    pub candidate: String,
    /// Each candidate's median time on the slice, in seconds, in candidate order.
    pub seconds: Vec<(String, f64)>,
}

/// The user's cache directory for the crate, if the platform has one.
fn default_cache_dir() -> Option<PathBuf> {
    if cfg!(target_arch = "wasm32") {
        return None;
    }
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    let base = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("LOCALAPPDATA").map(PathBuf::from))
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("margin-softmax"))
}

/// The findings of one context, and where they persist (kept in the context's caches).
#[derive(Debug)]
struct Tuner {
    file: Option<PathBuf>,
    found: HashMap<Bucket, Tuned>,
}

impl Tuner {
    /// The tuner for an adapter; it reads the adapter's cache file, if any.
    fn new(tuning: &Tuning, info: &wgpu::AdapterInfo) -> Tuner {
        let dir = match tuning {
            Tuning::Auto => default_cache_dir(),
            Tuning::CacheIn(dir) => Some(dir.clone()),
            Tuning::InMemory | Tuning::Off => None,
        };
        // The key: vendor and device id, and a hash of the driver and the crate version.
        let key = fnv1a(
            format!(
                "{} {} {} {}",
                info.driver,
                info.driver_info,
                info.name,
                env!("CARGO_PKG_VERSION")
            )
            .as_bytes(),
        );
        let file = dir.map(|d| {
            d.join(format!(
                "gemm-{:04x}-{:04x}-{key:016x}.tsv",
                info.vendor, info.device
            ))
        });
        let found = file.as_deref().map(read_cache).unwrap_or_default();
        Tuner { file, found }
    }

    /// Every finding so far, sorted by bucket.
    fn findings(&self) -> Vec<Tuned> {
        let mut all: Vec<Tuned> = self.found.values().cloned().collect();
        all.sort_by_key(|t| (t.bucket.layout, t.bucket.m, t.bucket.n, t.bucket.k));
        all
    }
}

impl Context {
    /// The candidate (an index into [`Context::gemm_candidates`]) that runs `layout` at
    /// m × n × k: the pinned one, the default where tuning is off, else the bucket's
    /// fastest, timed now if the bucket is new.
    pub(crate) fn gemm_choice(
        &self,
        layout: GemmLayout,
        rhs: ElementType,
        (m, n, k): (u32, u32, u32),
    ) -> Result<usize> {
        if self.gemm_pinned || self.tuning == Tuning::Off || self.kernels.candidates.len() < 2 {
            return Ok(self.gemm_candidate);
        }
        let bucket = Bucket::of(layout, rhs, m, n, k);
        let known = self.tuner(|t| t.found.get(&bucket).map(|t| t.candidate.clone()));
        let name = match known {
            Some(name) => name,
            None => {
                // Timed outside the caches' lock; a bucket two threads time at once is
                // kept as the last one found it. Where timing fails, the default serves.
                let Ok(tuned) = self.tune_bucket(layout, rhs, bucket) else {
                    return Ok(self.gemm_candidate);
                };
                let name = tuned.candidate.clone();
                self.tuner(|t| {
                    t.found.insert(bucket, tuned);
                    if let Some(file) = &t.file {
                        write_cache(file, &t.found);
                    }
                });
                name
            }
        };
        // A cache from another set of candidates names one this context lacks: default.
        Ok(self
            .kernels
            .candidates
            .iter()
            .position(|c| c.name == name)
            .unwrap_or(self.gemm_candidate))
    }

    /// Times every candidate on the bucket's slice (one warm-up, the median of RUNS).
    fn tune_bucket(&self, layout: GemmLayout, rhs: ElementType, bucket: Bucket) -> Result<Tuned> {
        let slice = self.tuning_slice(layout, bucket);
        // A candidate that fails to run is left out of the findings.
        let seconds: Vec<(String, f64)> = self
            .kernels
            .candidates
            .iter()
            .enumerate()
            .filter_map(|(index, c)| {
                let time = self.time_candidate(&slice, (layout, rhs), index, c).ok()?;
                Some((c.name.to_string(), time))
            })
            .collect();
        if seconds.is_empty() {
            return Err(crate::Error::Gpu(
                "no GEMM candidate ran on the tuning slice".into(),
            ));
        }
        let fastest = seconds
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(name, _)| name.clone())
            .unwrap_or_default();
        Ok(Tuned {
            bucket,
            candidate: fastest,
            seconds,
        })
    }

    /// The bucket's slice (at most SLICE) in `layout`, its operands all 0.5.
    fn tuning_slice(&self, layout: GemmLayout, bucket: Bucket) -> TuningSlice {
        let (m, n, k) = (
            bucket.m.min(SLICE.0),
            bucket.n.min(SLICE.1),
            bucket.k.min(SLICE.2),
        );
        let (lhs_along_k, rhs_along_k) = layout.along_k();
        let pad = |v: u32| v.next_multiple_of(4);
        let lhs_stride = if lhs_along_k { pad(k) } else { pad(m) };
        let rhs_stride = if rhs_along_k { pad(k) } else { pad(n) };
        let lhs_len = if lhs_along_k {
            m * lhs_stride
        } else {
            k * lhs_stride
        };
        let rhs_len = if rhs_along_k {
            n * rhs_stride
        } else {
            k * rhs_stride
        };
        let gemm = GemmShape::new((m, n, k), lhs_stride, rhs_stride, n);
        let storage = |len: u32| {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("tuning operand"),
                    contents: bytemuck::cast_slice(&vec![0.5f32; len as usize]),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        let (lhs, rhs, product) = (storage(lhs_len), storage(rhs_len), storage(m * n));
        let uniform = gemm.uniform(&self.device, "tuning shape");
        TuningSlice {
            gemm,
            uniform,
            lhs,
            rhs,
            product,
        }
    }

    /// The median seconds of candidate `index` on `slice`, after one warm-up run.
    fn time_candidate(
        &self,
        slice: &TuningSlice,
        (layout, rhs): (GemmLayout, ElementType),
        index: usize,
        candidate: &crate::kernels::GemmCandidate,
    ) -> Result<f64> {
        let grid = fold_grid(
            slice.gemm.workgroups(candidate),
            self.limits.max_compute_workgroups_per_dimension,
        )?;
        let dispatch = [Dispatch {
            kernel: self.kernels.matmul(layout, rhs, index)?,
            grid,
            resources: vec![
                slice.uniform.as_entire_buffer_binding(),
                slice.lhs.as_entire_buffer_binding(),
                slice.rhs.as_entire_buffer_binding(),
                slice.product.as_entire_buffer_binding(),
            ],
        }];
        // GPU timestamps where the adapter has them: a discrete GPU runs the slice in
        // microseconds, less than a submit and wait takes.
        let queries = TimestampQueries::new(self);
        let record: Record<'_> =
            &|encoder, writes| encode(&self.device, encoder, &dispatch, writes);
        let mut runs = Vec::with_capacity(RUNS);
        for run in 0..=RUNS {
            let seconds = time_recording(self, queries.as_ref(), record)?;
            if run > 0 {
                runs.push(seconds);
            }
        }
        runs.sort_by(f64::total_cmp);
        Ok(runs[RUNS / 2])
    }

    /// Runs `f` on this context's tuner (made, and its cache file read, on first use).
    fn tuner<R>(&self, f: impl FnOnce(&mut Tuner) -> R) -> R {
        self.with_cache(|| Tuner::new(&self.tuning, &self.info), f)
    }

    /// Every bucket this context has tuned or read from its cache file.
    pub fn tuned(&self) -> Vec<Tuned> {
        self.tuner(|t| t.findings())
    }

    /// The tuner's cache file, if its findings persist.
    pub fn tuning_file(&self) -> Option<PathBuf> {
        self.tuner(|t| t.file.clone())
    }
}

/// FNV-1a, 64 bits: a stable hash for the cache file's name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The findings in a cache file: one line per bucket,
/// `layout m n k candidate name=seconds …`; unreadable lines are skipped.
fn read_cache(file: &Path) -> HashMap<Bucket, Tuned> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(parse_line)
        .map(|t| (t.bucket, t))
        .collect()
}

fn parse_line(line: &str) -> Option<Tuned> {
    let mut fields = line.split('\t');
    let layout = GemmLayout::KEYS
        .iter()
        .flatten()
        .copied()
        .find(|&key| Some(key) == fields.clone().next())?;
    fields.next();
    let mut dim = || fields.next()?.parse::<u32>().ok();
    let bucket = Bucket {
        layout,
        m: dim()?,
        n: dim()?,
        k: dim()?,
    };
    let candidate = fields.next()?.to_string();
    let seconds = fields
        .map(|f| {
            let (name, s) = f.split_once('=')?;
            Some((name.to_string(), s.parse::<f64>().ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Tuned {
        bucket,
        candidate,
        seconds,
    })
}

/// One bucket's line in the cache file.
fn cache_line(t: &Tuned) -> String {
    let b = t.bucket;
    let times: Vec<String> = t
        .seconds
        .iter()
        .map(|(n, s)| format!("{n}={s:e}"))
        .collect();
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}",
        b.layout,
        b.m,
        b.n,
        b.k,
        t.candidate,
        times.join("\t")
    )
}

/// Writes the findings to `file` through a temporary file and a rename, so that a reader
/// never sees half a file. A cache that cannot be written is left as it is: the
/// findings still hold in memory.
fn write_cache(file: &Path, found: &HashMap<Bucket, Tuned>) {
    let Some(dir) = file.parent() else { return };
    // Another context (or process) may have written findings since this one read the
    // file: keep theirs too, this context's winning where both timed a bucket.
    let mut merged = read_cache(file);
    merged.extend(found.iter().map(|(b, t)| (*b, t.clone())));
    let mut lines: Vec<String> = merged.values().map(cache_line).collect();
    lines.sort();
    // A temporary file of this writer's own, renamed into place.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let serial = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = file.with_extension(format!("tmp{}-{serial}", std::process::id()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&temp, lines.join("\n") + "\n"))
        .and_then(|()| std::fs::rename(&temp, file));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
}
