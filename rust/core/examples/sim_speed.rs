// Quick check while developing: cargo run --release -p horae-core --example sim_speed -- TRACE
use horae_core::sched::{bench::admission_benchmark, PolicyKind, SchedulerConfig};
use horae_core::sim::{load_trace, simulate, CostModel, LoadModel, SimConfig, Sla};
fn main() {
    let path = std::env::args().nth(1).expect("trace path");
    for n in [1024, 1024, 1024] {
        println!("{:?}", admission_benchmark(n, 2000, 1));
    }
    if std::env::var("ONLY_BENCH").is_ok() { return; }
    let t0 = std::time::Instant::now();
    let trace = load_trace(path.as_ref(), None).unwrap();
    println!("load {:.3}s, {} requests", t0.elapsed().as_secs_f64(), trace.requests.len());
    for p in PolicyKind::ALL {
        let cfg = SimConfig {
            sched: SchedulerConfig { policy: p, ..Default::default() },
            cost: CostModel::roofline("llama-2-7b", "a100-80gb").unwrap(),
            max_tokens: 4096,
            load: LoadModel::Open,
        };
        let t = std::time::Instant::now();
        let r = simulate(&trace, &cfg).unwrap();
        let s = r.summary(&Sla::paper());
        println!("ttft {:?}\nitl {:?}\nqueue {:?} kv {:.2} dur {:.0}", s.ttft, s.max_itl, s.queue_delay, s.mean_kv_usage, s.duration);
        println!("{p}: {:.3}s wall, {} steps, goodput {:.1} tok/s, att {:.3}, preempt {}", t.elapsed().as_secs_f64(), r.steps.len(), s.goodput_tps, s.sla_attainment, s.preemptions);
    }
}
