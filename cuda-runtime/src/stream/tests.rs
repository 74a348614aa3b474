use super::sim::{SimCosts, SimDevice, SimOp};
use super::*;

const GB: u64 = 1 << 30;

fn inputs(layers: &[u64], chunks: usize, chunk_bytes: u64, budget: u64) -> StreamInputs {
    StreamInputs { layer_bytes: layers.to_vec(), chunks, chunk_bytes, workspace: GB, budget }
}

/// Runs `inputs` on a simulated device of `memory` bytes uploading at 50 GB/s.
fn simulate(i: &StreamInputs, compute_s: &[f64], memory: u64) -> (StreamReport, SimDevice) {
    let p = plan(i).unwrap();
    let costs = SimCosts::from_rates(&i.layer_bytes, 50e9, compute_s, i.chunk_bytes);
    let mut dev = SimDevice::new(memory, costs);
    let report = run(&mut dev, &p).unwrap();
    assert!(dev.violations.is_empty(), "invariants broken:\n{}", dev.violations.join("\n"));
    for c in 0..i.chunks {
        assert_eq!(dev.chunk_layers(c), Some(i.layer_bytes.len()), "chunk {c} did not go through every layer");
    }
    (report, dev)
}

#[test]
fn everything_is_resident_when_it_fits() {
    let i = inputs(&[10 * GB, 12 * GB, 11 * GB], 4, GB, 40 * GB);
    let p = plan(&i).unwrap();
    assert_eq!((p.layer_buffer, p.layer_buffers, p.staging, p.resident()), (12 * GB, 2, 0, 4));
    assert_eq!(p.device_bytes(), 24 * GB + GB + 4 * GB);
}

#[test]
fn chunks_beyond_the_budget_are_paged_and_the_budget_is_respected() {
    // 2 × 12 GB + 1 GB workspace + 2 staging chunks = 27 GB; 30 GB leaves 3 resident chunks of 8.
    let i = inputs(&[10 * GB, 12 * GB, 11 * GB], 8, GB, 30 * GB);
    let p = plan(&i).unwrap();
    assert_eq!((p.staging, p.resident()), (2, 3));
    assert_eq!(p.chunks[3], ChunkPlace::Paged);
    assert!(p.device_bytes() <= i.budget, "{} > {}", p.device_bytes(), i.budget);
    assert_eq!(p.device_bytes(), 30 * GB);
    // One byte less than two buffers, the workspace and two chunks: refused, with the figures.
    let tight = inputs(&[10 * GB, 12 * GB], 8, GB, 27 * GB - 1);
    match plan(&tight) {
        Err(CudaRuntimeError::Budget { needed, layer_buffer, .. }) => {
            assert_eq!((needed, layer_buffer), (27 * GB, 12 * GB))
        }
        other => panic!("expected a budget error, got {other:?}"),
    }
    assert!(matches!(plan(&inputs(&[], 1, 1, GB)), Err(CudaRuntimeError::Plan { .. })));
    assert!(matches!(plan(&inputs(&[GB], 0, 1, GB)), Err(CudaRuntimeError::Plan { .. })));
}

#[test]
fn a_one_layer_model_takes_one_buffer() {
    let p = plan(&inputs(&[5 * GB], 2, GB, 10 * GB)).unwrap();
    assert_eq!((p.layer_buffers, p.device_bytes()), (1, 5 * GB + GB + 2 * GB));
}

#[test]
fn the_next_upload_is_issued_before_the_host_waits_and_overlaps_the_compute() {
    let layers = [10 * GB; 5];
    let (_, dev) = simulate(&inputs(&layers, 2, GB, 40 * GB), &[0.3; 5], 40 * GB);
    for l in 0..4 {
        let (up, up_rec) = dev.find(|o| matches!(o, SimOp::Upload { layer, .. } if *layer == l + 1))[0];
        let computes = dev.find(|o| matches!(o, SimOp::Compute { layer, .. } if *layer == l));
        let (last_compute, comp_rec) = *computes.last().unwrap();
        let (wait, _) = dev.find(|o| matches!(o, SimOp::Wait { record } if *record == last_compute))[0];
        assert!(up < wait, "layer {}: upload issued at log line {up}, after the wait for layer {l} at {wait}", l + 1);
        // Compute-bound (0.215 s per upload, 0.6 s of compute per layer): the upload runs during the compute.
        assert!(
            up_rec.start < comp_rec.end && up_rec.end > computes[0].1.start,
            "layer {}: upload {:.3}..{:.3} s does not overlap layer {l}'s compute {:.3}..{:.3} s",
            l + 1,
            up_rec.start,
            up_rec.end,
            computes[0].1.start,
            comp_rec.end
        );
    }
}

#[test]
fn never_more_than_two_layer_buffers_alternating() {
    let (_, dev) = simulate(&inputs(&[GB; 7], 3, GB, 40 * GB), &[0.01; 7], 40 * GB);
    let slots: Vec<usize> =
        dev.log.iter().filter_map(|r| if let SimOp::Upload { slot, .. } = r.op { Some(slot) } else { None }).collect();
    assert_eq!(slots, vec![0, 1, 0, 1, 0, 1, 0]);
}

#[test]
fn the_simulated_run_takes_what_the_time_model_says() {
    // Compute-bound layers, upload-bound layers, and a mix: the simulation (which also checks the
    // buffers) ends when projected_seconds says, within the pipeline's bounds.
    for compute in [vec![0.5; 6], vec![0.05; 6], vec![0.5, 0.01, 0.4, 0.02, 0.3, 0.9]] {
        let layers = [10 * GB, 11 * GB, 9 * GB, 12 * GB, 10 * GB, 8 * GB];
        let (report, _) = simulate(&inputs(&layers, 1, GB, 40 * GB), &compute, 40 * GB);
        let times: Vec<LayerTimes> = layers
            .iter()
            .zip(&compute)
            .map(|(&b, &c)| LayerTimes { upload_s: b as f64 / 50e9, compute_s: c })
            .collect();
        let model = projected_seconds(&times);
        assert!((report.total_s - model).abs() < 1e-9, "simulated {} s, model {model} s", report.total_s);
        assert!(
            (report.projected_s() - model).abs() < 1e-9,
            "from the report's measured times: {}",
            report.projected_s()
        );
        let (su, sc): (f64, f64) = (times.iter().map(|t| t.upload_s).sum(), times.iter().map(|t| t.compute_s).sum());
        assert!(model >= su.max(sc) - 1e-12 && model < su + sc, "model {model} outside [{}, {})", su.max(sc), su + sc);
        for (l, r) in report.layers.iter().enumerate() {
            assert!(
                (r.upload_s - times[l].upload_s).abs() < 1e-12 && (r.compute_s - compute[l]).abs() < 1e-12,
                "layer {l}: {r:?}"
            );
        }
    }
}

#[test]
fn the_time_model_has_the_pipeline_closed_forms() {
    let n = 61;
    // Upload-bound: every upload back to back, then the last compute.
    let up = vec![LayerTimes { upload_s: 2.0, compute_s: 1.0 }; n];
    assert!((projected_seconds(&up) - (n as f64 * 2.0 + 1.0)).abs() < 1e-9);
    // Compute-bound: the first upload, then every compute back to back.
    let comp = vec![LayerTimes { upload_s: 1.0, compute_s: 2.0 }; n];
    assert!((projected_seconds(&comp) - (1.0 + n as f64 * 2.0)).abs() < 1e-9);
    assert_eq!(projected_seconds(&[]), 0.0);
    let ds = layer_pattern(
        LayerTimes { upload_s: 0.3, compute_s: 0.1 },
        3,
        LayerTimes { upload_s: 0.2, compute_s: 0.4 },
        58,
    );
    assert_eq!(ds.len(), 61);
    assert_eq!((ds[2].upload_s, ds[3].upload_s), (0.3, 0.2));
}

#[test]
fn paged_activations_go_out_and_back_in_every_layer_and_stay_current() {
    let layers = [4 * GB; 4];
    // 2 × 4 + 1 workspace + 2 staging = 11 GB; 12 GB leaves 1 resident chunk of 5.
    let i = inputs(&layers, 5, GB, 12 * GB);
    let (report, dev) = simulate(&i, &[0.02; 4], 12 * GB);
    assert_eq!((report.plan.resident(), report.plan.staging), (1, 2));
    let ins = dev.find(|o| matches!(o, SimOp::PageIn { .. })).len();
    let outs = dev.find(|o| matches!(o, SimOp::PageOut { .. })).len();
    assert_eq!((ins, outs), (4 * 4, 4 * 4), "4 paged chunks through 4 layers");
    let reserved: Vec<u64> =
        dev.log.iter().filter_map(|r| if let SimOp::Reserve { bytes } = r.op { Some(bytes) } else { None }).collect();
    assert_eq!(reserved, vec![12 * GB]);
    assert!(report.layers.iter().all(|l| l.page_in_s > 0.0 && l.page_out_s > 0.0));
    // A device smaller than the plan refuses it.
    let p = plan(&i).unwrap();
    let mut small = SimDevice::new(11 * GB, SimCosts::from_rates(&layers, 50e9, &[0.02; 4], GB));
    assert!(run(&mut small, &p).is_err());
}

#[test]
fn the_simulated_device_catches_an_upload_over_a_buffer_in_use() {
    // A schedule that forgets the dependency: layer 2 into buffer 0 while layer 0 computes.
    let i = inputs(&[GB; 3], 1, GB, 10 * GB);
    let p = plan(&i).unwrap();
    let mut dev = SimDevice::new(10 * GB, SimCosts::from_rates(&i.layer_bytes, 50e9, &[1.0; 3], GB));
    dev.reserve(&p).unwrap();
    let u0 = dev.upload(0, 0, &[]).unwrap();
    dev.compute(0, 0, 0, ActSlot::Resident(0), &[u0.end]).unwrap();
    dev.upload(2, 0, &[]).unwrap();
    assert!(dev.violations.iter().any(|v| v.contains("before its last reader ends")), "{:?}", dev.violations);
    // And a compute of a layer that is not in its buffer.
    dev.compute(1, 1, 0, ActSlot::Resident(0), &[]).unwrap();
    assert!(dev.violations.iter().any(|v| v.contains("compute of layer 1")), "{:?}", dev.violations);
}

#[test]
fn budgets_parse_with_units_and_percentages() {
    let total = 141 * GB;
    assert_eq!(parse_budget("80G", total).unwrap(), 80 * GB);
    assert_eq!(parse_budget("80GiB", total).unwrap(), 80 * GB);
    assert_eq!(parse_budget("80GB", total).unwrap(), 80_000_000_000);
    assert_eq!(parse_budget("1.5T", total).unwrap(), 3 * (1 << 40) / 2);
    assert_eq!(parse_budget("4096", total).unwrap(), 4096);
    assert_eq!(parse_budget(" 50% ", total).unwrap(), total / 2);
    for bad in ["", "G", "80X", "0", "-1G", "150%", "0%", "x%"] {
        assert!(matches!(parse_budget(bad, total), Err(CudaRuntimeError::Plan { .. })), "{bad:?} accepted");
    }
}
