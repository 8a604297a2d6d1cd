//! One patient orientation for every tensor, whichever way the patient lay and the
//! scanner stored the image.
//!
//! The tensor's axes run, in DICOM's patient coordinates (LPS), along depth +z (toward
//! the head), height +y (toward the back) and width +x (toward the patient's left): the
//! image of a supine, head-first scan as scanners store it. A prone scan (its image
//! turned 180°), a feet-first one (mirrored left–right, slices running toward the feet)
//! and one of a patient on their side (rows and columns swapped) are resampled onto the
//! same axes, so the model sees every patient the same way up. Series whose axes are more
//! than 45° from every patient axis are not axial; ingest does not choose them.

/// How the tensor's axes lie on a series' axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The image's rows run along the patient's y axis (and its columns along x): the
    /// tensor's width comes from the image's rows (row index), its height from the
    /// columns (column index).
    pub transposed: bool,
    /// Whether each tensor axis (depth, height, width) runs against the series axis it
    /// is read from.
    pub reversed: [bool; 3],
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

const X: [f64; 3] = [1.0, 0.0, 0.0];
const Y: [f64; 3] = [0.0, 1.0, 0.0];
const Z: [f64; 3] = [0.0, 0.0, 1.0];

/// The placement for a series whose rows run along `row` (the direction in which the
/// column index grows), whose columns run along `column`, and whose slices are ordered
/// along `slice`.
pub fn placement(row: [f64; 3], column: [f64; 3], slice: [f64; 3]) -> Placement {
    let transposed = dot(row, X).abs() < dot(row, Y).abs();
    // The series axis each tensor axis is read from: width, height.
    let (width_from, height_from) = if transposed { (column, row) } else { (row, column) };
    Placement {
        transposed,
        reversed: [dot(slice, Z) < 0.0, dot(height_from, Y) < 0.0, dot(width_from, X) < 0.0],
    }
}

/// `positions` in the order the tensor axis reads them.
pub fn ordered(mut positions: Vec<f64>, reversed: bool) -> Vec<f64> {
    if reversed {
        positions.reverse();
    }
    positions
}

/// A `rows × columns` plane, row-major, turned into `columns × rows`.
pub fn transpose(plane: &[f32], rows: usize, columns: usize) -> Vec<f32> {
    let mut out = vec![0.0; plane.len()];
    for row in 0..rows {
        for column in 0..columns {
            out[column * rows + row] = plane[row * columns + column];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
        [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
    }

    #[test]
    fn each_way_a_patient_lies_is_placed_on_the_same_axes() {
        let cases = [
            // Supine, head first: the tensor's own orientation.
            ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], false, [false, false, false]),
            // Prone, head first: the image turned 180°.
            ([-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], false, [false, true, true]),
            // Supine, feet first: mirrored left–right; slices ordered toward the feet.
            ([-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], false, [true, false, true]),
            // On the side: rows run back to front.
            ([0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], true, [false, false, true]),
        ];
        for (row, column, transposed, reversed) in cases {
            let found = placement(row, column, cross(row, column));
            assert_eq!(found, Placement { transposed, reversed }, "{row:?} {column:?}");
        }
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
            [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
        assert_eq!(ordered(vec![1.0, 2.0], true), [2.0, 1.0]);
    }
}
