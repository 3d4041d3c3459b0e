// Development check: greedy-decode token ids with a model folder.
// cargo run --release -p horae-core --example greedy -- MODEL_DIR 1,2,3
use horae_core::engine::{Engine, Prompt, RequestSpec, WallClock};
use horae_core::model::ModelExecutor;
use horae_core::sched::{Scheduler, SchedulerConfig};
fn main() {
    let dir = std::env::args().nth(1).expect("model dir");
    let ids: Vec<u32> = std::env::args().nth(2).expect("ids").split(',').map(|x| x.parse().unwrap()).collect();
    let cfg = SchedulerConfig { kv_cache_tokens: 4096, max_output_bound: 64, ..Default::default() };
    let t = std::time::Instant::now();
    let exec = ModelExecutor::load(dir.as_ref(), cfg.kv_cache_tokens / cfg.block_size, cfg.block_size).unwrap();
    println!("load {:?}", t.elapsed());
    let mut e = Engine::new(Scheduler::new(cfg, None).unwrap(), Box::new(exec), Box::new(WallClock::default()));
    let spec = RequestSpec { prompt: Prompt::Tokens(ids), max_tokens: 20, ignore_eos: false, arrival: None, sampling: Default::default() };
    e.add_request(spec).unwrap();
    let t = std::time::Instant::now();
    while e.has_work() {
        for f in e.step().unwrap().finished {
            println!("{:?} {:?}", f.output, f.finish_reason());
        }
    }
    println!("gen {:?}", t.elapsed());
}
