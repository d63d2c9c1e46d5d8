use std::net::SocketAddr;
use std::time::Instant;

use super::wire::*;
use super::*;

fn quick() -> RingConfig {
    RingConfig {
        op_timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(20),
        chunk_bytes: 64,
        ..RingConfig::default()
    }
}

/// Forms a world of `n` engines in threads of this process.
fn world(n: usize, cfg: RingConfig) -> Vec<CpuRingEngine> {
    let host = CpuRingEngine::host(n, cfg.clone()).expect("host");
    let token = host.token().to_vec();
    let peers: Vec<_> = (1..n)
        .map(|r| {
            let token = token.clone();
            let cfg = cfg.clone();
            thread::spawn(move || CpuRingEngine::connect(&token, r, n, cfg))
        })
        .collect();
    let mut out = vec![host.accept().expect("accept")];
    for p in peers {
        out.push(p.join().expect("join").expect("connect"));
    }
    out
}

/// Runs `f` on every engine in its own thread; results in rank order.
fn on_all<T: Send + 'static>(
    engines: Vec<CpuRingEngine>,
    f: impl Fn(&mut CpuRingEngine) -> T + Send + Sync + Clone + 'static,
) -> Vec<(CpuRingEngine, T)> {
    let hs: Vec<_> = engines
        .into_iter()
        .map(|mut e| {
            let f = f.clone();
            thread::spawn(move || {
                let t = f(&mut e);
                (e, t)
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().expect("join")).collect()
}

#[test]
fn token_round_trips_and_rejects_garbage() {
    let addr: SocketAddr = "127.0.0.1:4567".parse().expect("addr");
    let t = encode_token(&[7; NONCE_LEN], &addr);
    assert!(t.len() < 100);
    assert_eq!(decode_token(&t).expect("decode"), ([7; NONCE_LEN], addr));
    assert!(decode_token(b"nope").is_err());
    assert!(decode_token(&t[..t.len() - 1]).is_err());
    let mut longer = t.clone();
    longer.push(0);
    assert!(decode_token(&longer).is_err());
}

#[test]
fn segments_cover_buffer_in_order() {
    let mut v: Vec<u32> = (0..10).collect();
    let segs = split_segments(&mut v, 3, 2);
    let lens: Vec<Vec<usize>> = segs
        .iter()
        .map(|s| {
            s.iter()
                .map(|c| c.as_ref().map_or(0, |c| c.len()))
                .collect()
        })
        .collect();
    assert_eq!(lens, vec![vec![2, 1], vec![2, 1], vec![2, 2]]);
    let mut small = [1u8, 2];
    let segs = split_segments(&mut small, 3, 4);
    assert_eq!(
        segs.iter().map(|s| s.len()).collect::<Vec<_>>(),
        vec![0, 1, 1]
    );
}

#[test]
fn threads_all_reduce_and_broadcast() {
    for n in [2usize, 3] {
        let engines = world(n, quick());
        let out = on_all(engines, move |e| {
            let r = e.rank();
            let mut v: Vec<f32> = (0..37).map(|i| (i * (r + 1)) as f32).collect();
            e.all_reduce_mean(&mut v).expect("all-reduce");
            let mut b: Vec<u8> = if r == 1 {
                (0..200).map(|i| i as u8).collect()
            } else {
                vec![0; 200]
            };
            e.broadcast_bytes(&mut b, 1).expect("broadcast");
            e.barrier().expect("barrier");
            (v, b)
        });
        let ranks_sum: usize = (1..=n).sum();
        for (_, (v, b)) in &out {
            for (i, x) in v.iter().enumerate() {
                assert_eq!(*x, (i * ranks_sum) as f32 / n as f32);
            }
            assert_eq!(b, &(0..200).map(|i| i as u8).collect::<Vec<_>>());
        }
    }
}

#[test]
fn abort_unblocks_a_waiting_call() {
    let mut engines = world(2, quick());
    let e1 = engines.pop().expect("rank 1");
    let mut e0 = engines.pop().expect("rank 0");
    let h = e0.abort_handle();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        h.abort();
    });
    let start = Instant::now();
    let mut v = vec![1.0f32; 1000];
    let err = e0.all_reduce_mean(&mut v).expect_err("aborted");
    assert!(matches!(err, CollectiveError::Aborted { rank: 0 }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    t.join().expect("join");
    // The peer now fails at once instead of waiting for its timeout.
    let mut e1 = e1;
    let start = Instant::now();
    let err = e1.all_reduce_mean(&mut v).expect_err("peer gone");
    assert!(start.elapsed() < Duration::from_secs(5), "{err}");
    // And both stay poisoned.
    assert!(matches!(
        e1.barrier(),
        Err(CollectiveError::Poisoned { .. })
    ));
    assert!(matches!(e0.barrier(), Err(CollectiveError::Aborted { .. })));
}

#[test]
fn timeout_when_a_peer_never_calls() {
    let cfg = RingConfig {
        op_timeout: Duration::from_millis(300),
        ..quick()
    };
    let mut engines = world(2, cfg);
    let _idle = engines.pop();
    let mut e0 = engines.pop().expect("rank 0");
    let mut v = vec![1.0f32; 4];
    let err = e0.all_reduce_mean(&mut v).expect_err("timeout");
    assert!(
        matches!(
            err,
            CollectiveError::Timeout {
                rank: 0,
                peer: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn abort_interrupts_a_join() {
    let cfg = quick();
    // A host that never accepts: the peer waits for its answer.
    let host = CpuRingEngine::host(2, cfg.clone()).expect("host");
    let peer = CpuRingEngine::peer(1, 2, cfg).expect("peer");
    let h = peer.abort_handle();
    let token = host.token().to_vec();
    let t = thread::spawn(move || peer.join(&token));
    thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    h.abort();
    let err = t.join().expect("join").expect_err("aborted");
    assert!(matches!(err, CollectiveError::Aborted { rank: 1 }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(host);
}

#[test]
fn rendezvous_rejects_wrong_world_size() {
    let cfg = quick();
    let host = CpuRingEngine::host(2, cfg.clone()).expect("host");
    let token = host.token().to_vec();
    let peer = thread::spawn(move || CpuRingEngine::connect(&token, 1, 3, cfg));
    let err = host.accept().expect_err("refused");
    assert!(err.to_string().contains("3 ranks"), "{err}");
    let err = peer.join().expect("join").expect_err("refused");
    assert!(err.to_string().contains("rank 0 refused rank 1"), "{err}");
}

/// Rank 0 of a world of two whose rank 1 is the test: returns the engine
/// and the test's ends of rank 0's left (the test writes) and right (the
/// test reads) links.
fn rank0_facing_the_test(cfg: RingConfig) -> (CpuRingEngine, TcpStream, TcpStream) {
    let pair = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dialed = TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        (dialed, accepted)
    };
    let (left, test_writes) = pair();
    let (right, test_reads) = pair();
    let engine =
        CpuRingEngine::from_streams(0, 2, left, right, Shared::new(0), cfg).expect("engine");
    (engine, test_writes, test_reads)
}

fn keepalive_cfg() -> RingConfig {
    RingConfig {
        op_timeout: Duration::from_secs(20),
        keepalive_interval: Duration::from_millis(50),
        silence_timeout: Duration::from_millis(400),
        ..quick()
    }
}

#[test]
fn an_idle_engine_sends_keepalives_to_its_right() {
    let (_engine, _left, mut right) = rank0_facing_the_test(keepalive_cfg());
    right
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    for _ in 0..3 {
        let mut b = [0u8; 1];
        right.read_exact(&mut b).expect("a keepalive");
        assert_eq!(b[0], KEEPALIVE);
    }
}

#[test]
fn a_neighbour_that_keeps_the_link_alive_is_waited_for_past_the_silence_timeout() {
    let (mut engine, mut left, right) = rank0_facing_the_test(keepalive_cfg());
    // The neighbour is "computing" for three silence timeouts, sending
    // keepalives, then stops sending anything: a stalled link.
    let neighbour = thread::spawn(move || {
        for _ in 0..24 {
            left.write_all(&[KEEPALIVE]).expect("keepalive");
            thread::sleep(Duration::from_millis(50));
        }
        thread::sleep(Duration::from_secs(3));
        drop((left, right));
    });
    let start = Instant::now();
    let err = engine
        .all_reduce_mean(&mut [1.0f32; 8])
        .expect_err("the link went silent");
    let waited = start.elapsed();
    assert!(
        matches!(
            err,
            CollectiveError::Timeout {
                rank: 0,
                peer: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("0.4 s"), "{err}");
    // 1.2 s of keepalives, then 0.4 s of silence; far below the op timeout.
    assert!(
        waited >= Duration::from_millis(1_400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    neighbour.join().expect("join");
}

#[test]
fn keepalives_do_not_stretch_the_wait_past_the_op_timeout() {
    let cfg = RingConfig {
        op_timeout: Duration::from_millis(700),
        ..keepalive_cfg()
    };
    let (mut engine, mut left, _right) = rank0_facing_the_test(cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    // Alive but never reaching the call (a deadlocked step).
    let neighbour = thread::spawn(move || {
        while !stopped.load(Ordering::SeqCst) {
            if left.write_all(&[KEEPALIVE]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    let start = Instant::now();
    let err = engine.barrier().expect_err("op timeout");
    let waited = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    assert!(err.to_string().contains("0.7 s"), "{err}");
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    neighbour.join().expect("join");
}

#[test]
fn a_slow_neighbour_with_keepalives_completes_the_call() {
    let cfg = keepalive_cfg();
    let engines = world(3, cfg);
    let out = on_all(engines, |e| {
        // Rank 2 computes for three silence timeouts first.
        if e.rank() == 2 {
            thread::sleep(Duration::from_millis(1_200));
        }
        let mut v = vec![e.rank() as f32; 1000];
        e.all_reduce_mean(&mut v).map(|()| v[0])
    });
    for (_, got) in out {
        assert_eq!(got.expect("all-reduce"), 1.0);
    }
}
