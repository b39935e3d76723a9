#[path = "support/garage.rs"]
mod garage;
use object_store::{signer::Signer, Attribute, Attributes, ObjectStore, PutMode, PutOptions, PutPayload};
use std::time::{Duration, Instant};

fn store(g: &garage::Garage, i: usize) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(g.endpoint(i))
        .with_bucket_name(g.bucket())
        .with_region(g.region())
        .with_access_key_id(g.access_key_id())
        .with_secret_access_key(g.secret_access_key())
        .with_allow_http(true)
        .build()
        .unwrap()
}

#[test]
fn probe() {
    let t = Instant::now();
    let mut g = garage::Garage::start();
    eprintln!("PROBE start took {:?}", t.elapsed());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s0 = store(&g, 0);
    let s1 = store(&g, 1);
    rt.block_on(async {
        let p = object_store::path::Path::from("a/b");
        s0.put(&p, PutPayload::from_static(b"hello")).await.unwrap();
        let got = s1.get(&p).await.unwrap().bytes().await.unwrap();
        eprintln!("PROBE put on 0, get on 1: {:?}", got);
        // conditional
        let c = object_store::path::Path::from("cond");
        let r1 = s0.put_opts(&c, PutPayload::from_static(b"one"), PutMode::Create.into()).await;
        let r2 = s0.put_opts(&c, PutPayload::from_static(b"two"), PutMode::Create.into()).await;
        let now = s0.get(&c).await.unwrap().bytes().await.unwrap();
        eprintln!("PROBE create#1 {:?}\nPROBE create#2 {:?}\nPROBE content now {:?}", r1.map(|_| ()), r2.map(|_| ()), now);
        let r3 = s1.put_opts(&c, PutPayload::from_static(b"three"), PutMode::Create.into()).await;
        eprintln!("PROBE create#3 via node1 {:?}", r3.map(|_| ()));
        // update with etag
        let meta = s0.head(&c).await.unwrap();
        let upd = PutMode::Update(object_store::UpdateVersion { e_tag: Some("\"bogus\"".into()), version: None });
        let r4 = s0.put_opts(&c, PutPayload::from_static(b"four"), upd.into()).await;
        eprintln!("PROBE update with bogus etag {:?} (etag was {:?})", r4.map(|_| ()), meta.e_tag);
        // content type
        let ct = object_store::path::Path::from("ct");
        let mut attrs = Attributes::new();
        attrs.insert(Attribute::ContentType, "application/vnd.test+json".into());
        s0.put_opts(&ct, PutPayload::from_static(b"{}"), PutOptions { attributes: attrs, ..Default::default() }).await.unwrap();
        let r = s1.get(&ct).await.unwrap();
        eprintln!("PROBE attributes back: {:?}", r.attributes);
        // presigned
        let url = s0.signed_url(http::Method::GET, &p, Duration::from_secs(300)).await.unwrap();
        std::fs::write("/tmp/probe/url", url.as_str()).unwrap();
        let out = std::process::Command::new("curl").args(["-sS", "-i", url.as_str()]).output().unwrap();
        eprintln!("PROBE presigned curl:\n{}", String::from_utf8_lossy(&out.stdout));
    });
    // kill node 2
    g.kill_node(2);
    rt.block_on(async {
        for i in 0..3 {
            let t = Instant::now();
            let p = object_store::path::Path::from(format!("after-kill-{i}"));
            let r = s0.put(&p, PutPayload::from_static(b"x")).await;
            let pt = t.elapsed();
            let t = Instant::now();
            let gr = match s1.get(&p).await { Ok(r) => r.bytes().await.map(|b| b.len()), Err(e) => Err(e) };
            eprintln!("PROBE node2 down, put#{i}: {:?} in {:?}; get: {:?} in {:?}", r.map(|_| ()), pt, gr, t.elapsed());
        }
        let t = Instant::now();
        let l = s0.list_with_delimiter(None).await.map(|l| l.objects.len());
        eprintln!("PROBE list with node2 down {:?} in {:?}", l, t.elapsed());
    });
    let t = Instant::now();
    g.start_node(2);
    let s2 = store(&g, 2);
    rt.block_on(async {
        loop {
            let p = object_store::path::Path::from("after-kill-0");
            match s2.get(&p).await {
                Ok(r) => { eprintln!("PROBE node2 restarted, serves after {:?}: {:?}", t.elapsed(), r.bytes().await.map(|b| b.len())); break; }
                Err(e) if t.elapsed() > Duration::from_secs(30) => panic!("node 2 never came back: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    // two kills: no quorum
    g.kill_node(1);
    g.kill_node(2);
    rt.block_on(async {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(60), s0.put(&object_store::path::Path::from("noquorum"), PutPayload::from_static(b"x"))).await;
        eprintln!("PROBE two nodes down, put: {:?} in {:?}", r.map(|r| r.map(|_| ())), t.elapsed());
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(60), s0.get(&object_store::path::Path::from("a/b"))).await;
        eprintln!("PROBE two nodes down, get: {:?} in {:?}", r.map(|r| r.map(|_| ())), t.elapsed());
    });
    let t = Instant::now();
    drop(g);
    eprintln!("PROBE drop took {:?}", t.elapsed());
}
