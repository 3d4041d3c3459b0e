//! The served engine from Rust, as the Python binding drives it: `engine::build` on a model
//! folder, the one set of request checks, the inbox, steps on the caller's thread and on the
//! engine's own, stop rules decided in the core, aborts that free their blocks.

mod common;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use horae_core::engine::{build, EngineArgs, EngineHandle, EngineInfo, RequestOutput, ServerRules};
use horae_core::request::{FinishReason, RequestParams, StopReason};
use horae_core::sample::SamplingParams;
use horae_core::HoraeError;

/// tiny-llama3 with a word-level tokenizer over its 256 ids ("t0" .. "t255"), written once per
/// process: the tests run in parallel, and rewriting a weights file that another test's engine
/// has mapped is a SIGBUS (it happened in CI).
fn model_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let vocab = (0..256).map(|i| (format!("t{i}"), i.into())).collect();
        write_model_dir("words", vocab, serde_json::Value::Null)
    })
    .clone()
}

/// tiny-llama3 with a byte-level vocabulary instead: token b is byte b (in the byte-level
/// alphabet GPT-2's tokenizers spell bytes with), as structured output reads a vocabulary.
fn byte_level_model_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        // Printable bytes stand for themselves; the others for the characters from U+0100 on.
        let mut next = 0x100u32;
        let vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
            .map(|b| {
                let c = if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                    b as char
                } else {
                    next += 1;
                    char::from_u32(next - 1).unwrap()
                };
                (c.to_string(), u64::from(b).into())
            })
            .collect();
        let decoder = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        write_model_dir("bytes", vocab, decoder)
    })
    .clone()
}

fn write_model_dir(
    name: &str,
    vocab: serde_json::Map<String, serde_json::Value>,
    decoder: serde_json::Value,
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("horae-serving-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(common::golden_dir("tiny-llama3").join(f), dir.join(f)).unwrap();
    }
    let unk = vocab.keys().next().unwrap().clone();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": decoder,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    dir
}

fn engine_in(dir: PathBuf) -> (EngineHandle, EngineInfo) {
    let args = EngineArgs { device: "cpu".into(), kv_cache_tokens: Some(1024), seed: Some(1), ..EngineArgs::new(dir) };
    build(args).unwrap()
}

fn engine() -> (EngineHandle, EngineInfo) {
    engine_in(model_dir())
}

fn greedy(prompt: Vec<i64>, max_tokens: i64) -> RequestParams {
    RequestParams {
        prompt_token_ids: prompt,
        max_tokens: Some(max_tokens),
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Step until every request finished; each request's outputs in order.
fn run(h: &EngineHandle) -> std::collections::BTreeMap<u64, Vec<RequestOutput>> {
    let mut outs: std::collections::BTreeMap<u64, Vec<RequestOutput>> = Default::default();
    while h.has_unfinished() {
        for o in h.step().unwrap().outputs {
            outs.entry(o.id).or_default().push(o);
        }
    }
    outs
}

#[test]
fn requests_are_checked_once_with_the_field_named() {
    let (h, info) = engine();
    // Structured output needs each token's bytes, which a tokenizer without a decoder does not
    // give: said at start (`horae serve` prints it), and a request asking for it is refused.
    let e = h.prepare_structured_output().unwrap_err().to_string();
    assert!(e.contains("not available for this model"), "{e}");
    let regex = Some(horae_core::grammar::Constraint::Regex("t1".into()));
    assert!(matches!(
        h.add_request(RequestParams { structured_outputs: regex, ..greedy(vec![5], 4) }),
        Err(HoraeError::BadRequest { param: Some("structured_outputs"), .. })
    ));
    assert_eq!((info.device.as_str(), info.kv_cache_tokens), ("cpu", 1024));
    let param = |p: RequestParams| match h.add_request(p) {
        Err(HoraeError::BadRequest { param, .. }) => param,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(param(greedy(vec![], 4)), Some("prompt"));
    assert_eq!(param(greedy(vec![300], 4)), Some("prompt"));
    assert_eq!(param(greedy(vec![5; 10], 0)), Some("max_tokens"));
    // tiny-llama3's context is 512 tokens: refused, not capped.
    assert_eq!(param(greedy(vec![5; 10], 600)), Some("max_tokens"));
    assert_eq!(param(RequestParams { top_k: -2, ..greedy(vec![5], 4) }), Some("top_k"));
    assert_eq!(param(RequestParams { stop_token_ids: vec![999], ..greedy(vec![5], 4) }), Some("stop_token_ids"));
    let hot = SamplingParams { temperature: -1.0, ..SamplingParams::greedy() };
    assert_eq!(param(RequestParams { sampling: hot, ..greedy(vec![5], 4) }), Some("temperature"));
    assert!(!h.has_unfinished(), "nothing refused was queued");
}

#[test]
fn the_core_decides_every_stop_and_streams_text_once() {
    let (h, _) = engine();
    let prompt: Vec<i64> = (10..30).collect();
    let plain = h.add_request(greedy(prompt.clone(), 12)).unwrap();
    let outs = run(&h);
    let tokens: Vec<u32> = outs[&plain].iter().flat_map(|o| o.new_token_ids.clone()).collect();
    let plain_text: String = outs[&plain].iter().map(|o| o.new_text.as_str()).collect();
    let text = plain_text.clone();
    let last = outs[&plain].last().unwrap();
    assert_eq!((tokens.len(), last.finish_reason), (12, Some(FinishReason::Length)));
    let words: Vec<String> = tokens.iter().map(|t| format!("t{t}")).collect();
    assert_eq!(text.split_whitespace().collect::<Vec<_>>(), words, "the text is the tokens' text, sent once");

    // A stop token id: the last token returned, its text not.
    let stop = tokens[5];
    let first = tokens.iter().position(|&t| t == stop).unwrap();
    let id = h.add_request(RequestParams { stop_token_ids: vec![stop as i64], ..greedy(prompt.clone(), 12) }).unwrap();
    let outs = run(&h);
    let got: Vec<u32> = outs[&id].iter().flat_map(|o| o.new_token_ids.clone()).collect();
    let text: String = outs[&id].iter().map(|o| o.new_text.as_str()).collect();
    assert_eq!(got, tokens[..=first]);
    assert_eq!(text.split_whitespace().count(), first, "the stop token's text is left out");
    assert_eq!(outs[&id].last().unwrap().stop_reason, Some(StopReason::Token(stop)));

    // A stop string over two tokens: cut from the text, never half sent.
    let s = format!("{} {}", words[3], words[4]);
    let id = h.add_request(RequestParams { stop: vec![s.clone()], ..greedy(prompt, 12) }).unwrap();
    let outs = run(&h);
    let text: String = outs[&id].iter().map(|o| o.new_text.as_str()).collect();
    let cut = plain_text.find(&s).expect("the stop string is in the plain output");
    assert_eq!(text, plain_text[..cut], "cut before the stop string, and nothing past the cut was ever sent");
    assert_eq!(outs[&id].last().unwrap().stop_reason, Some(StopReason::Text(s)));
    assert_eq!(h.stats().kv_used_blocks, 0);
}

#[test]
fn the_step_thread_serves_and_an_abort_frees_its_blocks() {
    let (h, _) = engine();
    // The loop thread hands each step's outputs over and waits for a go: the test sees every
    // step, and acts between two of them, deterministically.
    let (tx, rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    h.start_loop(move |events| {
        let _ = tx.send(events.map(|e| e.outputs));
        let _ = go_rx.recv_timeout(Duration::from_secs(10));
    })
    .unwrap();
    assert!(h.step().is_err(), "no step on the caller's thread while the loop runs");
    let long = h.add_request(greedy((1..40).collect(), 400)).unwrap();
    let short = h.add_request(greedy((50..60).collect(), 5)).unwrap();
    let (mut finished, mut seen_long) = (Vec::new(), false);
    loop {
        for o in rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap() {
            seen_long |= o.id == long && !o.new_token_ids.is_empty();
            if o.finish_reason.is_some() {
                finished.push(o.id);
            }
        }
        if finished.contains(&short) && seen_long {
            break; // the loop now waits in its callback, between two steps
        }
        go_tx.send(()).unwrap();
    }
    assert_eq!(finished, vec![short], "the long request is still running");
    assert!(h.stats().kv_used_blocks > 0);
    // An abort while the loop runs goes to the inbox; the next look at the engine applies it.
    h.abort(long);
    assert!(!h.has_unfinished());
    assert_eq!(h.stats().kv_used_blocks, 0, "the aborted request's blocks are free");
    let loop_thread = h.stop_loop().unwrap();
    go_tx.send(()).unwrap();
    loop_thread.join().unwrap();
}

#[test]
fn a_request_that_waited_elsewhere_keeps_its_first_arrival() {
    // A router's resend (the Ray ingress) says how long the request already waited: the queue
    // deadline counts from its first arrival. With a 5 s deadline, one that waited 10 s is
    // dropped at the next step, having cost nothing; one that waited 1 s is served.
    let rules = ServerRules { queue_timeout: Some(5.0), ..Default::default() };
    let args = EngineArgs {
        device: "cpu".into(),
        kv_cache_tokens: Some(1024),
        seed: Some(1),
        rules,
        ..EngineArgs::new(model_dir())
    };
    let (h, _) = build(args).unwrap();
    let late = h.add_request(RequestParams { waited: 10.0, ..greedy(vec![5; 8], 4) }).unwrap();
    let fresh = h.add_request(RequestParams { waited: 1.0, ..greedy(vec![6; 8], 4) }).unwrap();
    let outs = run(&h);
    assert_eq!(outs[&late].last().unwrap().finish_reason, Some(FinishReason::Timeout));
    assert_eq!(outs[&fresh].last().unwrap().finish_reason, Some(FinishReason::Length));
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        match h.add_request(RequestParams { waited: bad, ..greedy(vec![5], 4) }) {
            Err(HoraeError::BadRequest { param, message }) => {
                assert_eq!(param, Some("waited"));
                assert!(message.contains("finite number of seconds >= 0"), "{message}");
            }
            other => panic!("expected a refusal of waited={bad}, got {other:?}"),
        }
    }
}

/// Structured output (`structured_outputs`): every drawn token keeps the text in its language,
/// and the request ends where the language does (with `stop`, even with `ignore_eos`: nothing
/// could follow). In this vocabulary token b is byte b, so the language picks the tokens.
#[test]
fn structured_output_draws_only_what_its_grammar_allows() {
    use horae_core::grammar::Constraint;
    let (h, _) = engine_in(byte_level_model_dir());
    h.prepare_structured_output().unwrap();
    let with = |c: Constraint, ignore_eos: bool| RequestParams {
        structured_outputs: Some(c),
        ignore_eos,
        ..greedy(vec![5, 9, 12, 40], 12)
    };
    let a = h.add_request(with(Constraint::Regex("a{12}".into()), true)).unwrap();
    let choice = || Constraint::Choice(vec!["yes".into(), "no".into()]);
    let b = h.add_request(with(choice(), true)).unwrap();
    let c = h.add_request(with(choice(), false)).unwrap();
    let d = h
        .add_request(with(
            Constraint::Json(r#"{"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}"#.into()),
            false,
        ))
        .unwrap();
    let plain = h.add_request(greedy(vec![5, 9, 12, 40], 12)).unwrap();
    let outs = run(&h);
    let text = |id: u64| outs[&id].iter().map(|o| o.new_text.clone()).collect::<String>();
    let tokens = |id: u64| outs[&id].iter().flat_map(|o| o.new_token_ids.clone()).collect::<Vec<u32>>();
    let end = |id: u64| outs[&id].last().unwrap().finish_reason;
    assert_eq!((text(a), end(a)), ("a".repeat(12), Some(FinishReason::Length)));
    for id in [b, c] {
        assert!(["yes", "no"].contains(&text(id).as_str()), "{:?}", text(id));
        assert_eq!(end(id), Some(FinishReason::Stop));
    }
    // Two integers in a JSON list, within 12 tokens (a byte each) or cut at the length.
    let t = text(d);
    if end(d) == Some(FinishReason::Stop) {
        let v: Vec<i64> = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
        assert_eq!(v.len(), 2);
    } else {
        assert!(t.starts_with('['), "{t:?}");
    }
    // The same prompt without a grammar draws something else: the mask did the choosing.
    assert_ne!(tokens(plain), tokens(a));
    // Bad grammars are the caller's error, named, and the engine goes on.
    for bad in [
        Constraint::Regex("(a".into()),
        Constraint::Grammar("start: nothing_defined".into()),
        Constraint::Json(r#"{"type": 5}"#.into()),
    ] {
        match h.add_request(with(bad.clone(), false)) {
            Err(HoraeError::BadRequest { param: Some("structured_outputs"), message }) => {
                assert!(message.starts_with("structured_outputs"), "{message}")
            }
            other => panic!("{bad:?}: expected a refusal, got {other:?}"),
        }
    }
    assert!(!h.has_unfinished());
}

/// A token holding part of a character: its text is a replacement character, its bytes are the
/// bytes (OpenAI's logprob `bytes`, joined over a text's tokens, are its UTF-8); a vocabulary
/// llguidance cannot read that way gives its text's.
#[test]
fn a_tokens_bytes_are_its_bytes_where_its_text_cannot_say() {
    use horae_core::tokenizer::Tokenizer;
    let t = Tokenizer::from_dir(&byte_level_model_dir()).unwrap();
    let euro = "€".as_bytes(); // E2 82 AC: three tokens here
    assert_eq!(t.decode(&[u32::from(euro[0])], false).unwrap(), "\u{fffd}");
    let joined: Vec<u8> = euro.iter().flat_map(|&b| t.token_bytes(u32::from(b)).unwrap()).collect();
    assert_eq!(joined, euro);
    assert_eq!(t.token_bytes(u32::from(b' ')).unwrap(), b" ");
    let words = Tokenizer::from_dir(&model_dir()).unwrap();
    assert_eq!(words.token_bytes(5).unwrap(), b"t5", "a word-level vocabulary: the text's bytes");
}

/// What the scheduler asks of a grammar when a step verifies drafts: how many of a proposer's
/// drafts stay in the language (cut before end-of-sequence), and the mask of each row, the
/// grammar moved through the drafts and back.
#[test]
fn a_grammar_takes_drafts_while_they_stay_in_its_language() {
    use horae_core::grammar::{Compiler, Constraint};
    use horae_core::tokenizer::Tokenizer;
    let dir = byte_level_model_dir();
    let tokenizer = std::sync::Arc::new(Tokenizer::from_dir(&dir).unwrap());
    let mut g = Compiler::new(tokenizer, 256, 2).compile(&Constraint::Regex("ab+".into())).unwrap();
    let (a, b, c) = (u32::from(b'a'), u32::from(b'b'), u32::from(b'c'));
    let allowed = |mask: &[u32]| (0..256).filter(|&t| mask[t / 32] >> (t % 32) & 1 == 1).collect::<Vec<usize>>();
    assert_eq!(g.valid_drafts(&[a, b, b, c, b]), 3);
    assert_eq!(g.valid_drafts(&[b]), 0);
    assert_eq!(g.valid_drafts(&[a, b, 2, b]), 2, "cut before end-of-sequence");
    let masks = g.masks_through(&[a, b]);
    assert_eq!(
        masks.iter().map(|m| allowed(m)).collect::<Vec<_>>(),
        vec![vec![a as usize], vec![b as usize], vec![2, b as usize]]
    );
    // Back where it was: the next token's mask is the first one again, and the drafts are
    // still taken from there.
    assert_eq!(allowed(&g.mask()), vec![a as usize]);
    assert_eq!(g.valid_drafts(&[a, b]), 2);
    g.accept(a);
    g.accept(b);
    assert!(!g.is_done());
    g.accept(2);
    assert!(g.is_done());
}

/// A grammar that starts after a tag (a reasoning model's end of thinking): free text, no masks
/// and drafts taken up to the token that completes the tag; then the language from the next
/// token. In the engine: the text before the tag is the model's, the text after it the grammar's.
#[test]
fn a_grammar_starts_after_its_tag() {
    use horae_core::grammar::{Compiler, Constraint};
    use horae_core::tokenizer::Tokenizer;
    let dir = byte_level_model_dir();
    let tokenizer = std::sync::Arc::new(Tokenizer::from_dir(&dir).unwrap());
    let byte = |c: u8| u32::from(c);
    let tag: Vec<u32> = b"</t>".iter().map(|&b| byte(b)).collect();
    let mut g =
        Compiler::new(tokenizer, 256, 2).compile(&Constraint::Regex("ab+".into())).unwrap().starting_after("</t>");
    let (a, b, x) = (byte(b'a'), byte(b'b'), byte(b'x'));
    assert!(g.masks_through(&[x, x]).is_empty(), "free text: no masks");
    assert_eq!(g.valid_drafts(&[x, x, x]), 3);
    let drafts: Vec<u32> = [x].into_iter().chain(tag.iter().copied()).chain([a, b]).collect();
    assert_eq!(g.valid_drafts(&drafts), 4, "drafts stop before the token that completes the tag");
    for t in [x, byte(b'<'), x] {
        g.accept(t); // a tag begun and broken off
    }
    assert!(!g.is_done() && g.masks_through(&[]).is_empty());
    for &t in &tag {
        g.accept(t);
    }
    let allowed = |mask: &[u32]| (0..256).filter(|&t| mask[t / 32] >> (t % 32) & 1 == 1).collect::<Vec<usize>>();
    assert_eq!(allowed(&g.masks_through(&[])[0]), vec![a as usize], "the language, from the token after the tag");
    for t in [a, b, 2] {
        g.accept(t);
    }
    assert!(g.is_done());

    // Through the engine: a logit bias makes the model write the tag "xx" first (it stays in
    // force after, where the language's mask leaves x no chance); then the language.
    let (h, _) = engine_in(byte_level_model_dir());
    let tokens = |id: u64| -> Vec<u32> { run(&h)[&id].iter().flat_map(|o| o.new_token_ids.clone()).collect() };
    let params = |after: &str| RequestParams {
        structured_outputs: Some(Constraint::Regex("ab{5}".into())),
        structured_outputs_after: after.into(),
        logit_bias: vec![(i64::from(x), 100.0)],
        ignore_eos: true,
        ..greedy(vec![5, 9, 12, 40], 40)
    };
    let language: Vec<u32> = b"abbbbb".iter().map(|&c| byte(c)).collect();
    // Ended by end-of-sequence where the language ends, which is not returned.
    assert_eq!(tokens(h.add_request(params("")).unwrap()), language);
    assert_eq!(tokens(h.add_request(params("xx")).unwrap()), [vec![x, x], language].concat());
    assert!(!h.has_unfinished());
}
