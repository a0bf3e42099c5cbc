//! Matrix–matrix products for prefill (more than `MAX_ROWS` activation rows) on CPUs whose
//! instructions beat candle's f32 GEMM: bf16 × bf16 with AVX-512 BF16 (`bf16.rs`) and q8_0
//! weights with AVX-512 VNNI (`q8.rs`).
//!
//! Both run on one panel sweep ([`sweep`]): the output's columns are cut into panels of a few
//! weight rows, one pool task per panel; a task packs its panel into the layout its kernel reads
//! ([`PanelKernel::pack`]), then runs the kernel over every tile of activation rows against it,
//! so the panel stays in L1 while the activations stream from L2. The two GEMMs differ only in
//! what a panel holds and in the kernel itself ([`PanelKernel::tile`]).

use rayon::prelude::*;

use crate::kernels::pool::OutPtr;

pub(crate) mod bf16;
pub mod q8;

/// Most activation rows a tile may have: [`run_tile`] instantiates the kernels up to this.
const MAX_TILE_ROWS: usize = 12;

/// One GEMM's side of the sweep: how its weights are packed per panel and how a tile of
/// activation rows is multiplied against a packed panel.
trait PanelKernel: Sync {
    /// One unit of a packed panel (a word, a cache line).
    type Packed;
    /// Output columns per panel: a whole number of 16-lane f32 vectors.
    const PANEL: usize;
    /// Activation rows per tile (at most [`MAX_TILE_ROWS`]): as many as keep the tile's
    /// accumulators in registers.
    const TILE_ROWS: usize;

    /// Packs weight rows `c0..c0 + cols` (`cols ≤ PANEL`) into `panel`, which holds the task's
    /// previous panel; columns past `cols` must add nothing.
    fn pack(&self, c0: usize, cols: usize, panel: &mut Vec<Self::Packed>);

    /// Multiplies activation rows `out.row0..out.row0 + R` by the packed `panel` and stores the
    /// products into `out`'s columns.
    ///
    /// # Safety
    /// The CPU has the kernel's instructions; `panel` was packed by [`PanelKernel::pack`] for
    /// `out`'s columns; those activation rows exist; and `out` addresses an `[m, n]` buffer
    /// whose tile this call alone writes.
    unsafe fn tile<const R: usize>(&self, panel: &[Self::Packed], out: TileOut);
}

/// Where one tile's products go: rows `row0..` of the row-major `[m, n]` f32 output, columns
/// `col0..col0 + cols`.
#[derive(Clone, Copy)]
struct TileOut {
    y: OutPtr,
    n: usize,
    row0: usize,
    col0: usize,
    cols: usize,
}

impl TileOut {
    /// The output element of the tile's row `r`, first column.
    ///
    /// # Safety
    /// Row `row0 + r` must be a row of the output.
    #[inline(always)]
    unsafe fn row(self, r: usize) -> *mut f32 {
        // SAFETY: the caller keeps the row within the `[m, n]` buffer; `col0 < n`.
        unsafe { self.y.0.add((self.row0 + r) * self.n + self.col0) }
    }
}

/// `y = x Wᵀ` as `[m, n]` f32 for the `m` activation rows and `n` weight rows `kernel` holds:
/// panels of `K::PANEL` weight rows in parallel, each swept by tiles of `K::TILE_ROWS`
/// activation rows.
///
/// # Safety
/// The CPU has `K`'s kernel instructions, and `kernel` holds `m` activation rows and `n`
/// weight rows.
unsafe fn sweep<K: PanelKernel>(kernel: &K, m: usize, n: usize) -> Vec<f32> {
    const { assert!(K::TILE_ROWS >= 1 && K::TILE_ROWS <= MAX_TILE_ROWS && K::PANEL % 16 == 0) };
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = OutPtr(y.as_mut_ptr());
    (0..n.div_ceil(K::PANEL)).into_par_iter().for_each_init(Vec::new, |panel: &mut Vec<K::Packed>, p| {
        let col0 = p * K::PANEL;
        let cols = (n - col0).min(K::PANEL);
        kernel.pack(col0, cols, panel);
        let mut row0 = 0;
        while row0 < m {
            let rows = (m - row0).min(K::TILE_ROWS);
            // SAFETY: the caller vouches for the CPU and the sizes; the panel was just packed for
            // these columns, rows row0..row0 + rows exist, and this task alone writes columns
            // col0..col0 + cols.
            unsafe { run_tile(kernel, panel, rows, TileOut { y: out, n, row0, col0, cols }) };
            row0 += rows;
        }
    });
    // SAFETY: the panels cover columns 0..n and each sweeps rows 0..m, so every element of the
    // m × n buffer was written above (the kernels' masked stores write exactly the `cols`
    // columns of each tile).
    unsafe { y.set_len(m * n) };
    y
}

/// [`PanelKernel::tile`] for `rows` (1..=`MAX_TILE_ROWS`) activation rows.
///
/// # Safety
/// As for [`PanelKernel::tile`].
unsafe fn run_tile<K: PanelKernel>(kernel: &K, panel: &[K::Packed], rows: usize, out: TileOut) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match rows {
            12 => kernel.tile::<12>(panel, out),
            11 => kernel.tile::<11>(panel, out),
            10 => kernel.tile::<10>(panel, out),
            9 => kernel.tile::<9>(panel, out),
            8 => kernel.tile::<8>(panel, out),
            7 => kernel.tile::<7>(panel, out),
            6 => kernel.tile::<6>(panel, out),
            5 => kernel.tile::<5>(panel, out),
            4 => kernel.tile::<4>(panel, out),
            3 => kernel.tile::<3>(panel, out),
            2 => kernel.tile::<2>(panel, out),
            _ => kernel.tile::<1>(panel, out),
        }
    }
}

/// A mask of the first `n.min(16)` lanes.
fn mask16(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A portable kernel on the shared sweep, so the sweep itself (panels, tiles, tails, the
    /// stores of every element) is checked on every CPU, whichever SIMD kernels it can run.
    struct Scalar<'a, const PANEL: usize, const TILE_ROWS: usize> {
        x: &'a [f32],
        w: &'a [f32],
        k: usize,
    }

    impl<const P: usize, const T: usize> PanelKernel for Scalar<'_, P, T> {
        type Packed = f32;
        const PANEL: usize = P;
        const TILE_ROWS: usize = T;

        /// `panel[i][c]` = weight row `c0 + c`, element `i`.
        fn pack(&self, c0: usize, cols: usize, panel: &mut Vec<f32>) {
            panel.clear();
            panel.resize(self.k * P, 0.0);
            for c in 0..cols {
                for i in 0..self.k {
                    panel[i * P + c] = self.w[(c0 + c) * self.k + i];
                }
            }
        }

        unsafe fn tile<const R: usize>(&self, panel: &[f32], out: TileOut) {
            for r in 0..R {
                let x = &self.x[(out.row0 + r) * self.k..][..self.k];
                for c in 0..out.cols {
                    let sum = x.iter().enumerate().map(|(i, xi)| xi * panel[i * P + c]).sum();
                    // SAFETY: the sweep hands this call rows row0..row0 + R and columns
                    // col0..col0 + cols of the output, for it alone.
                    unsafe { out.row(r).add(c).write(sum) };
                }
            }
        }
    }

    fn check<const P: usize, const T: usize>(m: usize, n: usize, k: usize) {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0).collect();
        // SAFETY: the portable kernel needs no instructions; x holds m rows and w n rows of k.
        let got = unsafe { sweep(&Scalar::<P, T> { x: &x, w: &w, k }, m, n) };
        assert_eq!(got.len(), m * n);
        for r in 0..m {
            for c in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
                assert_eq!(got[r * n + c], want, "{m}x{k}·{n} (panel {P}, tile {T}) at [{r}, {c}]");
            }
        }
    }

    #[test]
    fn the_sweep_writes_every_element_once_for_every_tail() {
        for (m, n, k) in [(1usize, 1usize, 1usize), (7, 15, 3), (8, 16, 4), (9, 17, 5), (13, 33, 2), (25, 64, 7), (37, 100, 6)] {
            check::<16, 8>(m, n, k);
            check::<32, 12>(m, n, k);
            check::<16, 1>(m, n, k);
        }
    }

    #[test]
    fn masks_cover_the_first_lanes() {
        assert_eq!(mask16(0), 0);
        assert_eq!(mask16(1), 1);
        assert_eq!(mask16(15), 0x7fff);
        assert_eq!(mask16(16), u16::MAX);
        assert_eq!(mask16(40), u16::MAX);
    }
}
