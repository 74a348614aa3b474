//! `fp8forge autotune` end to end: predicted tables for DeepSeek-V3 (legal, deterministic,
//! merged), and the errors of a measured run where no GPU is present.

use std::path::Path;

use fp8forge_autotune::table::{Source, Table, problem};
use fp8forge_kernels::is_legal;
use fp8forge_tests::{fp8forge_p, stderr};

/// DeepSeek-V3's config.json (the hub's, GEMM fields and what the runtime's validation requires).
fn deepseek_v3(dir: &Path) {
    let c = serde_json::json!({
        "model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128, "num_hidden_layers": 61,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
        "v_head_dim": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "n_shared_experts": 1, "first_k_dense_replace": 3, "vocab_size": 129280,
        "num_experts_per_tok": 8
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&c).expect("json")).expect("write config");
}

#[test]
fn simulated_deepseek_v3_tables_are_legal_and_deterministic() {
    let d = tempfile::tempdir().expect("tempdir");
    deepseek_v3(d.path());
    for gpu in ["h800", "h100-sxm"] {
        let out = |i: usize| d.path().join(format!("{gpu}-{i}.yaml"));
        for i in 0..2 {
            let o = fp8forge_p(&[
                "autotune".as_ref(),
                "--model".as_ref(),
                d.path().as_os_str(),
                "--simulate".as_ref(),
                "--gpu".as_ref(),
                gpu.as_ref(),
                "--out".as_ref(),
                out(i).as_os_str(),
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
        }
        let (a, b) = (std::fs::read(out(0)).expect("table"), std::fs::read(out(1)).expect("table"));
        assert_eq!(a, b, "{gpu}: two runs differ");
        let t: Table = serde_yaml::from_slice(&a).expect("a table");
        assert!(!t.is_stale());
        // 10 GEMM shapes (attention, dense MLP, shared and routed experts) x 13 M buckets.
        assert_eq!(t.entries.len(), 130, "{gpu}");
        for e in &t.entries {
            let c = e.config.own().expect("simulated entries are fp8forge's");
            assert_eq!(is_legal(&c, &problem(e.n, e.k, e.experts, e.m)), Ok(()), "{e:?}");
            assert_eq!(e.source, Source::Predicted);
            assert!(e.us > 0.0 && e.tflops > 0.0);
        }
    }
}

#[test]
fn simulate_merges_into_its_table_and_refuses_another_gpus() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("t.yaml");
    let run = |m: &str, gpu: &str| {
        fp8forge_p(&[
            "autotune",
            "--shape",
            "4096x7168",
            "--shape",
            "7168x2048x8",
            "--m",
            m,
            "--simulate",
            "--gpu",
            gpu,
            "--out",
            out.to_str().expect("utf-8"),
        ])
    };
    assert!(run("64", "h800").status.success());
    assert!(run("4096", "h800").status.success());
    let before = std::fs::read(&out).expect("table");
    let t: Table = serde_yaml::from_slice(&before).expect("a table");
    assert_eq!(t.entries.len(), 4);
    assert!(t.entries.iter().any(|e| e.experts == 8 && e.m == 4096));
    // An H100 table is not written over an H800 one.
    let o = run("64", "h100-sxm");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("h800-sxm"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).expect("table"), before);
}

#[test]
fn bad_autotune_arguments_exit_2() {
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("t.yaml");
    let out = out.to_str().expect("utf-8");
    for args in [
        vec!["autotune", "--shape", "4096x7168", "--simulate", "--out", out], // no --gpu
        vec!["autotune", "--shape", "4096x7168", "--simulate", "--gpu", "b200", "--out", out],
        vec!["autotune", "--shape", "4096", "--simulate", "--gpu", "h800", "--out", out],
        vec!["autotune", "--shape", "4096x7168", "--m", "0", "--simulate", "--gpu", "h800", "--out", out],
        vec!["autotune", "--shape", "4096x7168", "--budget", "0", "--out", out],
    ] {
        let o = fp8forge_p(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        // One line saying what is wrong (clap adds its --help hint below usage errors).
        assert!(stderr(&o).lines().next().is_some_and(|l| l.contains("error")), "{args:?}: {}", stderr(&o));
        assert!(!Path::new(out).exists());
    }
    // A shape the kernels cannot run is skipped with its reason, the rest is tuned.
    let o = fp8forge_p(&[
        "autotune",
        "--shape",
        "4096x7000",
        "--shape",
        "4096x7168",
        "--m",
        "64",
        "--simulate",
        "--gpu",
        "h800",
        "--out",
        out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("4096x7000"), "{}", stderr(&o));
}

#[test]
fn measuring_without_a_gpu_fails_cleanly_and_writes_nothing() {
    if fp8forge_kernels::cuda::Device::open(0).is_ok() {
        eprintln!("a CUDA device is present: this test is for machines without one (CI)");
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let out = d.path().join("t.yaml");
    let o = fp8forge_p(&["autotune", "--shape", "4096x7168", "--m", "64", "--out", out.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no CUDA device") && err.contains("--simulate"), "{err}");
    assert!(!out.exists());
}

#[test]
fn bench_gemm_refuses_a_table_it_cannot_read() {
    let d = tempfile::tempdir().expect("tempdir");
    let bad = d.path().join("bad.yaml");
    std::fs::write(&bad, "not: [a table").expect("write");
    for table in [bad.clone(), d.path().join("missing.yaml")] {
        let o = fp8forge_p(&[
            "bench".as_ref(),
            "gemm".as_ref(),
            "--shape".as_ref(),
            "64x4096x7168".as_ref(),
            "--table".as_ref(),
            table.as_os_str(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(table.file_name().and_then(|n| n.to_str()).expect("name")), "{}", stderr(&o));
    }
}

/// `autotune --simulate --gpu h800` on the model directory `dir` with `--m 64`: the output, and
/// the table when it succeeded.
fn simulate_model(dir: &Path) -> (std::process::Output, Option<Table>) {
    let out = dir.join("t.yaml");
    let o = fp8forge_p(&[
        "autotune".as_ref(),
        "--model".as_ref(),
        dir.as_os_str(),
        "--m".as_ref(),
        "64".as_ref(),
        "--simulate".as_ref(),
        "--gpu".as_ref(),
        "h800".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let table = std::fs::read(&out).ok().map(|b| serde_yaml::from_slice(&b).expect("a table"));
    (o, table)
}

#[test]
fn mixtral_and_qwen3_moe_configs_give_their_shapes_through_the_runtime_config() {
    let mixtral = serde_json::json!({
        "model_type": "mixtral", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "vocab_size": 32000
    });
    let qwen3 = serde_json::json!({
        "model_type": "qwen3_moe", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "vocab_size": 151936, "mlp_only_layers": []
    });
    for (config, want) in [
        (mixtral, vec![(4096, 4096, 1), (6144, 4096, 1), (4096, 14336, 8), (28672, 4096, 8)]),
        (qwen3, vec![(2048, 4096, 1), (5120, 2048, 1), (1536, 2048, 8), (2048, 768, 8)]),
    ] {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("config.json"), config.to_string()).expect("write config");
        let (o, table) = simulate_model(d.path());
        assert!(o.status.success(), "{}", stderr(&o));
        let mut got: Vec<(usize, usize, usize)> =
            table.expect("table").entries.iter().map(|e| (e.n, e.k, e.experts)).collect();
        got.sort();
        let mut want = want;
        want.sort();
        assert_eq!(got, want, "{config}");
    }
}

#[test]
fn a_model_config_the_runtime_refuses_exits_2_and_writes_nothing() {
    let d = tempfile::tempdir().expect("tempdir");
    let llama = serde_json::json!({
        "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
        "vocab_size": 32000, "intermediate_size": 11008
    });
    std::fs::write(d.path().join("config.json"), llama.to_string()).expect("write config");
    let (o, table) = simulate_model(d.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("llama"), "{}", stderr(&o));
    assert!(table.is_none());
    // A directory without config.json is the user's mistake too.
    let empty = tempfile::tempdir().expect("tempdir");
    let (o, _) = simulate_model(empty.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("config.json"), "{}", stderr(&o));
}

#[test]
fn a_table_that_cannot_be_read_is_a_system_failure_not_bad_input() {
    // A directory where a table file should be: reading it fails (EISDIR), unlike a missing or
    // malformed table (exit 2, above).
    let d = tempfile::tempdir().expect("tempdir");
    let o = fp8forge_p(&[
        "bench".as_ref(),
        "gemm".as_ref(),
        "--shape".as_ref(),
        "64x4096x7168".as_ref(),
        "--table".as_ref(),
        d.path().as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    let o = fp8forge_p(&[
        "autotune".as_ref(),
        "--shape".as_ref(),
        "4096x7168".as_ref(),
        "--m".as_ref(),
        "64".as_ref(),
        "--simulate".as_ref(),
        "--gpu".as_ref(),
        "h800".as_ref(),
        "--out".as_ref(),
        d.path().as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn bench_gemm_usage_errors_exit_2_before_the_gpu_is_opened() {
    for (args, says) in [
        (vec!["bench", "gemm"], "--shape"),
        (vec!["bench", "gemm", "--shape", "64x4096x7168", "--config", "wgmma_bm128"], "--config wgmma_bm128"),
        (vec!["bench", "gemm", "--shape", "64x4096x7000"], "K = 7000"),
        (vec!["bench", "gemm", "--shape", "100x4096x7168", "--groups", "0"], "must be positive"),
    ] {
        let o = fp8forge_p(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says) && !err.contains("CUDA"), "{args:?}: {err}");
    }
}
