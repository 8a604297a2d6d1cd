//! Every transfer syntax hospitals send, encoded by real third-party encoders (dcmtk and
//! GDCM, Debian's `dcmtk` and `libgdcm-tools`, installed by `cargo xtask dicom-tools`)
//! from panscreen's own synthetic slices, then read by ingest's header parser and
//! decoded to HU by preprocess.
//!
//! Lossless syntaxes must give exactly the HU of the uncompressed original; lossy ones
//! stay within the bound written beside each.

use std::path::{Path, PathBuf};
use std::process::Command;

use panscreen_preprocess::decode::{
    decode_opened, decode_slice, open_in_place, DecodeLimits, DecodedSlice,
};
use panscreen_synth::{encode_slice, Phantom, Rng, SeriesHeader, Slice};

const FILL: f32 = -1000.0;

/// One pixel format a scanner might write.
struct Variant {
    name: &'static str,
    signed: bool,
    bits_stored: u16,
    slope: f64,
    intercept: f64,
    padding: Option<i32>,
}

const VARIANTS: [Variant; 3] = [
    Variant {
        name: "unsigned-12bit",
        signed: false,
        bits_stored: 12,
        slope: 1.0,
        intercept: -1024.0,
        padding: None,
    },
    Variant {
        name: "signed-16bit-padded",
        signed: true,
        bits_stored: 16,
        slope: 1.0,
        intercept: 0.0,
        padding: Some(-2000),
    },
    Variant {
        name: "unsigned-16bit-slope-half",
        signed: false,
        bits_stored: 16,
        slope: 0.5,
        intercept: -1024.0,
        padding: Some(0),
    },
];

/// How far a decoded pixel may be from the original, in HU.
#[derive(Debug, Clone, Copy)]
enum Bound {
    Exact,
    /// Largest error of any pixel, and largest mean absolute error over the slice.
    Lossy {
        max: f32,
        mean: f32,
    },
}

struct Encoding {
    name: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    transfer_syntax: &'static str,
    bound: Bound,
}

const ENCODINGS: &[Encoding] = &[
    Encoding {
        name: "implicit VR little endian",
        program: "dcmconv",
        args: &["+ti"],
        transfer_syntax: "1.2.840.10008.1.2",
        bound: Bound::Exact,
    },
    Encoding {
        name: "explicit VR big endian",
        program: "dcmconv",
        args: &["+tb"],
        transfer_syntax: "1.2.840.10008.1.2.2",
        bound: Bound::Exact,
    },
    Encoding {
        name: "deflated explicit VR little endian",
        program: "dcmconv",
        args: &["+td"],
        transfer_syntax: "1.2.840.10008.1.2.1.99",
        bound: Bound::Exact,
    },
    Encoding {
        name: "RLE lossless (dcmtk)",
        program: "dcmcrle",
        args: &[],
        transfer_syntax: "1.2.840.10008.1.2.5",
        bound: Bound::Exact,
    },
    Encoding {
        name: "RLE lossless (GDCM)",
        program: "gdcmconv",
        args: &["--rle"],
        transfer_syntax: "1.2.840.10008.1.2.5",
        bound: Bound::Exact,
    },
    Encoding {
        name: "JPEG lossless process 14",
        program: "dcmcjpeg",
        args: &["+el"],
        transfer_syntax: "1.2.840.10008.1.2.4.57",
        bound: Bound::Exact,
    },
    Encoding {
        name: "JPEG lossless SV1",
        program: "dcmcjpeg",
        args: &["+e1"],
        transfer_syntax: "1.2.840.10008.1.2.4.70",
        bound: Bound::Exact,
    },
    Encoding {
        name: "JPEG-LS lossless",
        program: "dcmcjpls",
        args: &[],
        transfer_syntax: "1.2.840.10008.1.2.4.80",
        bound: Bound::Exact,
    },
    Encoding {
        name: "JPEG-LS lossless (GDCM)",
        program: "gdcmconv",
        args: &["--jpegls"],
        transfer_syntax: "1.2.840.10008.1.2.4.80",
        bound: Bound::Exact,
    },
    Encoding {
        name: "JPEG lossless (GDCM)",
        program: "gdcmconv",
        args: &["--jpeg"],
        transfer_syntax: "1.2.840.10008.1.2.4.70",
        bound: Bound::Exact,
    },
    Encoding {
        name: "JPEG 2000 lossless",
        program: "gdcmconv",
        args: &["--j2k"],
        transfer_syntax: "1.2.840.10008.1.2.4.90",
        bound: Bound::Exact,
    },
    // JPEG-LS near-lossless with NEAR = 2: no stored value moves by more than 2.
    Encoding {
        name: "JPEG-LS near-lossless",
        program: "gdcmconv",
        args: &["--jpegls", "--lossy", "-e", "2"],
        transfer_syntax: "1.2.840.10008.1.2.4.81",
        bound: Bound::Lossy { max: 2.0, mean: 2.0 },
    },
    Encoding {
        name: "JPEG baseline (8-bit, dcmtk rescales)",
        program: "dcmcjpeg",
        args: &["+eb"],
        transfer_syntax: "1.2.840.10008.1.2.4.50",
        bound: Bound::Lossy { max: 300.0, mean: 25.0 },
    },
    Encoding {
        name: "JPEG extended (12-bit)",
        program: "dcmcjpeg",
        args: &["+ee"],
        transfer_syntax: "1.2.840.10008.1.2.4.51",
        bound: Bound::Lossy { max: 200.0, mean: 8.0 },
    },
    Encoding {
        name: "JPEG 2000 lossy",
        program: "gdcmconv",
        args: &["--j2k", "--lossy", "-q", "70"],
        transfer_syntax: "1.2.840.10008.1.2.4.91",
        bound: Bound::Lossy { max: 150.0, mean: 16.0 },
    },
];

fn header(variant: &Variant) -> SeriesHeader {
    SeriesHeader {
        patient_name: "CODEC^TEST".into(),
        patient_id: "CODEC0001".into(),
        accession_number: "ACCCODEC1".into(),
        study_instance_uid: "2.25.9100".into(),
        series_instance_uid: "2.25.9101".into(),
        frame_of_reference_uid: "2.25.9102".into(),
        series_description: "ABDOMEN PLAIN".into(),
        rows: 128,
        columns: 128,
        pixel_spacing: [2.8, 2.8],
        signed_pixels: variant.signed,
        bits_stored: variant.bits_stored,
        rescale_slope: variant.slope,
        rescale_intercept: variant.intercept,
        padding_value: variant.padding,
        ..SeriesHeader::plain_ct()
    }
}

/// A 128×128 abdominal slice with noise and, where the variant has one, a padded corner.
fn write_original(directory: &Path, variant: &Variant) -> PathBuf {
    let header = header(variant);
    let mut rng = Rng::derive(11, &[variant.bits_stored as u64]);
    let phantom = Phantom::random(&mut rng, true);
    let origin = [-178.0, -178.0, 0.0];
    let mut hu = phantom.slice_hu(origin, header.pixel_spacing, 128, 128);
    for value in hu.iter_mut() {
        *value += (rng.normal() * 15.0) as f32;
    }
    if let Some(padding) = variant.padding {
        let padded_hu = padding as f32 * variant.slope as f32 + variant.intercept as f32;
        for row in 0..10 {
            hu[row * 128..row * 128 + 10].fill(padded_hu);
        }
    }
    let slice =
        Slice { sop_instance_uid: "2.25.9103", instance_number: 1, position: origin, hu: &hu };
    let path = directory.join(format!("{}.dcm", variant.name));
    std::fs::write(&path, encode_slice(&header, &slice).unwrap()).unwrap();
    path
}

fn encode(encoding: &Encoding, original: &Path, out: &Path) {
    let output = Command::new(encoding.program)
        .args(encoding.args)
        .arg(original)
        .arg(out)
        .output()
        .unwrap_or_else(|error| {
            panic!("{} cannot start ({error}); run `cargo xtask dicom-tools`", encoding.program)
        });
    assert!(
        output.status.success(),
        "{} {:?} failed: {}",
        encoding.program,
        encoding.args,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Preprocess opens objects with [`open_in_place`]: native little-endian pixel data is
/// read where it lies in the file, anything else parsed whole. Either way the HU must be
/// exactly those of the whole parse.
fn in_place_agrees(what: &str, bytes: &[u8], syntax: &str, whole: &DecodedSlice) {
    let opened = open_in_place(
        "encoded.dcm",
        bytes::Bytes::copy_from_slice(bytes),
        &DecodeLimits::default(),
    )
    .unwrap_or_else(|error| panic!("{what}: {error}"));
    let native = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"].contains(&syntax);
    assert_eq!(
        opened.in_place(),
        native,
        "{what}: pixels read in place only when native little endian"
    );
    let decoded = decode_opened("encoded.dcm", &opened, 0, FILL, Vec::new())
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    assert_eq!(decoded.position, whole.position, "{what}");
    assert!(
        decoded.hu.len() == whole.hu.len()
            && decoded.hu.iter().zip(&whole.hu).all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: HU differ when read in place"
    );
}

#[test]
fn every_transfer_syntax_decodes_to_the_original_hu() {
    panscreen_preprocess::gdcm_helper::set_program(panscreen_tests::binary());
    let scratch = tempfile::tempdir().unwrap();
    let (mut report, mut failures) = (Vec::new(), Vec::new());
    for variant in &VARIANTS {
        let original_path = write_original(scratch.path(), variant);
        let original_bytes = std::fs::read(&original_path).unwrap();
        let original = decode_slice("original", &original_bytes, FILL).unwrap();
        in_place_agrees(variant.name, &original_bytes, "1.2.840.10008.1.2.1", &original);
        if variant.padding.is_some() {
            assert_eq!(original.hu[0], FILL, "{}: padding becomes the fill value", variant.name);
        }
        assert!(original.hu[64 * 128 + 64] > -200.0, "{}: the centre is tissue", variant.name);
        for (index, encoding) in ENCODINGS.iter().enumerate() {
            let path = scratch.path().join(format!("{}-{index}.dcm", variant.name));
            encode(encoding, &original_path, &path);
            let bytes = std::fs::read(&path).unwrap();
            let header = panscreen_ingest::header::parse("encoded.dcm", bytes.len() as u64, &bytes)
                .unwrap_or_else(|problem| {
                    panic!("{} / {}: header: {problem:?}", variant.name, encoding.name)
                });
            assert_eq!(
                header.transfer_syntax, encoding.transfer_syntax,
                "{} / {}",
                variant.name, encoding.name
            );
            assert_eq!((header.rows, header.columns), (128, 128));
            let decoded = match decode_slice("encoded.dcm", &bytes, FILL) {
                Ok(decoded) => decoded,
                Err(error) => {
                    failures.push(format!("{} / {}: {error}", variant.name, encoding.name));
                    continue;
                }
            };
            assert_eq!(decoded.position, original.position);
            in_place_agrees(
                &format!("{} / {}", variant.name, encoding.name),
                &bytes,
                encoding.transfer_syntax,
                &decoded,
            );
            // Lossy codecs blur the edge of the padded corner, so padding is judged only
            // by lossless ones (above); errors are measured on the image around it.
            let errors: Vec<f32> = (0..128 * 128)
                .filter(|index| variant.padding.is_none() || index / 128 >= 13 || index % 128 >= 13)
                // A near-lossless codec may move a padding value by up to NEAR; such a
                // pixel is fill on one side only.
                .filter(|index| original.hu[*index] != FILL && decoded.hu[*index] != FILL)
                .map(|index| (original.hu[index] - decoded.hu[index]).abs())
                .collect();
            if variant.padding.is_some() && matches!(encoding.bound, Bound::Exact) {
                assert_eq!(
                    decoded.hu[0], FILL,
                    "{} / {}: padding is kept",
                    variant.name, encoding.name
                );
            }
            // An all-fill decode would compare nothing and pass: most pixels must be image.
            if errors.len() < 128 * 128 * 3 / 4 {
                failures.push(format!(
                    "{} / {}: only {} of {} pixels decoded to image (not fill)",
                    variant.name,
                    encoding.name,
                    errors.len(),
                    128 * 128
                ));
                continue;
            }
            let max = errors.iter().copied().fold(0.0f32, f32::max);
            let mean = errors.iter().sum::<f32>() / errors.len() as f32;
            report.push(format!(
                "{:<28} {:<40} max {max:7.2} HU  mean {mean:6.3} HU",
                variant.name, encoding.name
            ));
            let within = match encoding.bound {
                Bound::Exact => max == 0.0,
                Bound::Lossy { max: max_bound, mean: mean_bound } => {
                    max <= max_bound && mean <= mean_bound
                }
            };
            if !within {
                failures.push(format!(
                    "{} / {}: {:?} expected",
                    variant.name, encoding.name, encoding.bound
                ));
            }
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "outside their bounds:\n{}", failures.join("\n"));
}
