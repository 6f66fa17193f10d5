//! The article's figures: for every point of the unit sphere, the highest
//! margin-adjusted class probability, computed by the crate's forward kernels with the
//! sphere's points as the batch, and drawn as an orthographic view of both hemispheres.
//!
//! For class j as the assumed label, `p_j = e^{s(c_j − m)} / (e^{s(c_j − m)} + Σ_{k≠j} e^{s c_k})`;
//! p_j grows with c_j and falls with the others, so max_j p_j is p at the nearest class
//! (the argmax of c). Two forward passes give it: one with every label ignored yields
//! that class, one with it as the label yields its probability.

use crate::api::Pass;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::io::Shape;
use crate::io::IGNORE;
use crate::params::LossParams;
use crate::problem::host_vec;

/// The largest `size` [`render`] and [`render_grid`] accept: 8192 pixels across each
/// hemisphere is 53 million sphere points, several GB of host memory for the points and
/// the image, and past what most adapters bind in one buffer (12 bytes a point).
pub const MAX_SIZE: usize = 8192;

/// An RGB image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major RGB bytes, 3 per pixel.
    pub rgb: Vec<u8>,
}

impl Image {
    /// A white image, or [`Error::HostMemory`] where the host cannot hold it.
    fn try_new(width: usize, height: usize) -> Result<Image> {
        let len = width.checked_mul(height).and_then(|n| n.checked_mul(3));
        let mut rgb = host_vec("the image (3 bytes a pixel)", len)?;
        rgb.resize(len.unwrap_or(0), 255);
        Ok(Image { width, height, rgb })
    }

    /// The RGB value at (x, y); panics outside the image, as slice indexing does.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let at = (y * self.width + x) * 3;
        [self.rgb[at], self.rgb[at + 1], self.rgb[at + 2]]
    }

    fn set(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < self.width && y < self.height {
            let at = (y * self.width + x) * 3;
            self.rgb[at..at + 3].copy_from_slice(&rgb);
        }
    }

    /// Encodes the image as PNG (feature `cli`).
    #[cfg(feature = "cli")]
    pub fn to_png(&self) -> std::result::Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut bytes, self.width as u32, self.height as u32);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
            writer
                .write_image_data(&self.rgb)
                .map_err(|e| e.to_string())?;
        }
        Ok(bytes)
    }

    /// Writes the image as a PNG file (feature `cli`).
    #[cfg(feature = "cli")]
    pub fn write_png(&self, path: &std::path::Path) -> std::result::Result<(), String> {
        let bytes = self.to_png()?;
        std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// `classes` unit vectors spread evenly over the sphere (a Fibonacci lattice): the
/// seeded default when no trained class vectors are given. See
/// [`try_default_class_vectors`] for a count the host may not hold.
pub fn default_class_vectors(classes: usize) -> Vec<f32> {
    (0..classes)
        .flat_map(|k| lattice_point(k, classes))
        .collect()
}

/// [`default_class_vectors`], or [`Error::HostMemory`] where the host cannot allocate
/// the C×3 values (asked for before any is computed).
pub fn try_default_class_vectors(classes: usize) -> Result<Vec<f32>> {
    let mut v = host_vec("class vectors (C×3 f32 values)", classes.checked_mul(3))?;
    v.extend((0..classes).flat_map(|k| lattice_point(k, classes)));
    Ok(v)
}

/// The k-th of n points of the Fibonacci lattice.
fn lattice_point(k: usize, n: usize) -> [f32; 3] {
    let golden = std::f64::consts::PI * (3.0 - 5f64.sqrt());
    let z = 1.0 - 2.0 * (k as f64 + 0.5) / n as f64;
    let r = (1.0 - z * z).sqrt();
    let phi = golden * k as f64;
    [(r * phi.cos()) as f32, (r * phi.sin()) as f32, z as f32]
}

/// max_j p_j at each of the N points (N×3) for the C class vectors (C×3), on the GPU.
pub fn max_class_probability(
    ctx: &Context,
    points: &[f32],
    class_vectors: &[f32],
    params: &LossParams,
) -> Result<Vec<f32>> {
    let shape = Shape::new(points.len() / 3, 3, class_vectors.len() / 3);
    let nearest = ctx.loss(
        shape,
        points,
        class_vectors,
        &vec![IGNORE; shape.batch],
        params,
        Pass::Forward,
    )?;
    let labelled = ctx.loss(
        shape,
        points,
        class_vectors,
        &nearest.pred,
        params,
        Pass::Forward,
    )?;
    Ok(labelled.target_prob)
}

/// A colour ramp from dark blue (0) through teal and green to yellow (1).
fn colour(p: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let t = p.clamp(0.0, 1.0) * 4.0;
    let k = (t.floor() as usize).min(3);
    let f = t - k as f32;
    let mix = |a: f32, b: f32| (a + (b - a) * f).round() as u8;
    [
        mix(STOPS[k][0], STOPS[k + 1][0]),
        mix(STOPS[k][1], STOPS[k + 1][1]),
        mix(STOPS[k][2], STOPS[k + 1][2]),
    ]
}

/// Pixels of one orthographic disc of diameter `size`: (x, y, point on the sphere) with
/// the front hemisphere (z ≥ 0) or the back one (z ≤ 0, seen from behind, mirrored in x).
fn disc(size: usize, front: bool) -> Result<Vec<(usize, usize, [f32; 3])>> {
    let r = size as f32 / 2.0;
    let mut out = host_vec("the sphere's pixels", size.checked_mul(size))?;
    for y in 0..size {
        for x in 0..size {
            let u = (x as f32 + 0.5 - r) / r;
            let v = (r - y as f32 - 0.5) / r;
            let rr = u * u + v * v;
            if rr <= 1.0 {
                let z = (1.0 - rr).sqrt();
                out.push((x, y, if front { [u, v, z] } else { [-u, v, -z] }));
            }
        }
    }
    Ok(out)
}

/// Where a unit vector lands in the front (z ≥ 0) or back disc, if on that side.
fn project(p: [f32; 3], size: usize, front: bool) -> Option<(usize, usize)> {
    if (p[2] >= 0.0) != front {
        return None;
    }
    let r = size as f32 / 2.0;
    let u = if front { p[0] } else { -p[0] };
    let x = (u * r + r).clamp(0.0, size as f32 - 1.0) as usize;
    let y = (r - p[1] * r).clamp(0.0, size as f32 - 1.0) as usize;
    Some((x, y))
}

fn unit(v: &[f32]) -> [f32; 3] {
    let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt().max(1e-12);
    [v[0] / n, v[1] / n, v[2] / n]
}

fn mark(image: &mut Image, x0: usize, y0: usize, cx: usize, cy: usize, radius: i64, rgb: [u8; 3]) {
    for dy in -radius..=radius {
        for dx in -radius..=radius {
            if dx * dx + dy * dy <= radius * radius {
                let (x, y) = (cx as i64 + dx, cy as i64 + dy);
                if x >= 0 && y >= 0 {
                    image.set(x0 + x as usize, y0 + y as usize, rgb);
                }
            }
        }
    }
}

/// The front and back hemispheres side by side, `size` pixels across each: colour is
/// max_j p_j; where it is at most 0.5 the colour is dimmed, with a dark line at 0.5. Class
/// centres are white dots ringed in black; `dots` (N×3 features) are small black dots.
/// `size` is 8 to [`MAX_SIZE`]; [`Error::HostMemory`] where the host cannot hold the
/// points or the image.
pub fn render(
    ctx: &Context,
    class_vectors: &[f32],
    params: &LossParams,
    size: usize,
    dots: &[f32],
) -> Result<Image> {
    check_size(size)?;
    check_class_vectors(class_vectors)?;
    let gap = size / 16 + 2;
    let mut image = Image::try_new(2 * size + 3 * gap, size + 2 * gap)?;
    for (side, front) in [(0, true), (1, false)] {
        let x0 = gap + side * (size + gap);
        let pixels = disc(size, front)?;
        let mut points = host_vec(
            "the sphere's points (N×3 f32 values)",
            Some(pixels.len() * 3),
        )?;
        points.extend(pixels.iter().flat_map(|(_, _, p)| *p));
        let prob = max_class_probability(ctx, &points, class_vectors, params)?;
        drop(points);
        let mut grid = host_vec("the probability grid", Some(size * size))?;
        grid.resize(size * size, f32::NAN);
        for ((x, y, _), &p) in pixels.iter().zip(&prob) {
            grid[y * size + x] = p;
        }
        for &(x, y, _) in &pixels {
            let p = grid[y * size + x];
            let [r, g, b] = colour(p);
            let dim = |c: u8| {
                if p > 0.5 {
                    c
                } else {
                    (f32::from(c) * 0.45) as u8
                }
            };
            // The p = 0.5 contour: a neighbour on the other side of it.
            let edge = [(1usize, 0usize), (0, 1)].iter().any(|&(dx, dy)| {
                let q = grid
                    .get((y + dy) * size + x + dx)
                    .copied()
                    .unwrap_or(f32::NAN);
                q.is_finite() && (q > 0.5) != (p > 0.5)
            });
            let rgb = if edge {
                [20, 20, 20]
            } else {
                [dim(r), dim(g), dim(b)]
            };
            image.set(x0 + x, gap + y, rgb);
        }
        for point in dots.chunks_exact(3) {
            if let Some((x, y)) = project(unit(point), size, front) {
                mark(
                    &mut image,
                    x0,
                    gap,
                    x,
                    y,
                    (size / 160).max(1) as i64,
                    [0, 0, 0],
                );
            }
        }
        for class in class_vectors.chunks_exact(3) {
            if let Some((x, y)) = project(unit(class), size, front) {
                let radius = (size / 50).max(2) as i64;
                mark(&mut image, x0, gap, x, y, radius + 1, [0, 0, 0]);
                mark(&mut image, x0, gap, x, y, radius, [255, 255, 255]);
            }
        }
    }
    Ok(image)
}

/// `size` must be 8 to [`MAX_SIZE`] pixels.
fn check_size(size: usize) -> Result<()> {
    if (8..=MAX_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            name: "size",
            value: size as f32,
            requirement: "8 to 8192 (sphere::MAX_SIZE) pixels across each hemisphere",
        })
    }
}

/// Class vectors must be C×3 values with C ≥ 1.
fn check_class_vectors(class_vectors: &[f32]) -> Result<()> {
    if class_vectors.is_empty() {
        return Err(Error::EmptyShape {
            dimension: "classes",
        });
    }
    if !class_vectors.len().is_multiple_of(3) {
        return Err(Error::InvalidParameter {
            name: "class_vectors.len()",
            value: class_vectors.len() as f32,
            requirement: "a multiple of 3: C×3 values, one 3-vector per class",
        });
    }
    Ok(())
}

/// The article's sequence in one image: a row per margin, a column per scale, each cell
/// a [`render`] of both hemispheres. At least one scale and one margin.
pub fn render_grid(
    ctx: &Context,
    class_vectors: &[f32],
    scales: &[f32],
    margins: &[f32],
    size: usize,
) -> Result<Image> {
    check_size(size)?;
    check_class_vectors(class_vectors)?;
    for (name, list) in [("scales", scales), ("margins", margins)] {
        if list.is_empty() {
            return Err(Error::InvalidParameter {
                name,
                value: 0.0,
                requirement:
                    "a non-empty list: the grid has a column per scale and a row per margin",
            });
        }
    }
    let mut cells = Vec::new();
    for &margin in margins {
        for &scale in scales {
            let params = LossParams {
                scale,
                margin,
                ..LossParams::default()
            };
            cells.push(render(ctx, class_vectors, &params, size, &[])?);
        }
    }
    let (cw, ch) = cells.first().map_or((0, 0), |c| (c.width, c.height));
    let (width, height) = match (cw.checked_mul(scales.len()), ch.checked_mul(margins.len())) {
        (Some(w), Some(h)) => (w, h),
        _ => {
            return Err(Error::HostMemory {
                what: "the grid image",
                bytes: u64::MAX,
            })
        }
    };
    let mut image = Image::try_new(width, height)?;
    for (k, cell) in cells.iter().enumerate() {
        let (col, row) = (k % scales.len(), k / scales.len());
        for y in 0..ch {
            let from = y * cw * 3;
            let to = ((row * ch + y) * image.width + col * cw) * 3;
            image.rgb[to..to + cw * 3].copy_from_slice(&cell.rgb[from..from + cw * 3]);
        }
    }
    Ok(image)
}

/// Fraction of the sphere's area where max_j p_j > 0.5, measured on an even lattice of
/// `points` points.
pub fn high_probability_fraction(
    ctx: &Context,
    class_vectors: &[f32],
    params: &LossParams,
    points: usize,
) -> Result<f32> {
    let lattice = try_default_class_vectors(points)?;
    let prob = max_class_probability(ctx, &lattice, class_vectors, params)?;
    Ok(prob.iter().filter(|&&p| p > 0.5).count() as f32 / points.max(1) as f32)
}
