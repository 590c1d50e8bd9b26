//! A one-node cluster serves everything locally, through the same code paths.

use gallocy_core::{Access, Action, AppReply, AppRequest, Config, Node};

fn replies(node: &mut Node) -> Vec<(u64, AppReply)> {
    let mut actions = Vec::new();
    node.drain_actions(&mut actions);
    actions
        .into_iter()
        .filter_map(|a| match a {
            Action::Reply { token, reply } => Some((token, reply)),
            _ => None,
        })
        .collect()
}

fn create_space(node: &mut Node) -> u32 {
    node.handle_request(
        1,
        1,
        AppRequest::CreateSpace {
            name: "t".into(),
            base_addr: 0x1000_0000_0000,
            size_bytes: 64 << 20,
            chunk_size_bytes: 64 << 10,
            flexible_base: false,
            persistent: false,
            replicas: 2,
        },
    );
    match replies(node).pop() {
        Some((1, AppReply::Space(layout))) => layout.id,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn single_node_allocates_small_and_large_blocks_and_faults_locally() {
    let mut node = Node::new(Config::new(1, vec![1])).unwrap();
    node.tick(1);
    let space = create_space(&mut node);
    for (token, size_bytes) in [(2u64, 100u64), (3, 167_774), (4, 3 << 20)] {
        node.handle_request(
            2,
            token,
            AppRequest::Allocate {
                space,
                size_bytes,
                align_bytes: 16,
            },
        );
        let got = replies(&mut node);
        assert!(
            matches!(got.as_slice(), [(t, AppReply::Allocated { size_bytes: s, .. })] if *t == token && *s >= size_bytes),
            "allocation of {size_bytes}: {got:?}"
        );
    }
    node.tick(5);
    node.handle_request(
        6,
        9,
        AppRequest::Fault {
            space,
            addr: 0x1000_0000_0000,
            access: Access::Write,
        },
    );
    let got = replies(&mut node);
    assert!(
        matches!(
            got.as_slice(),
            [(
                9,
                AppReply::Granted {
                    access: Access::Write,
                    ..
                }
            )]
        ),
        "{got:?}"
    );
}

#[test]
fn the_root_block_cannot_be_freed() {
    let mut node = Node::new(Config::new(1, vec![1])).unwrap();
    node.tick(1);
    let space = create_space(&mut node);
    // Every process publishes pointers in the root block: freeing it would hand it out
    // again while they still use it.
    node.handle_request(
        2,
        7,
        AppRequest::Free {
            space,
            addr: 0x1000_0000_0000,
        },
    );
    let got = replies(&mut node);
    assert!(
        matches!(
            got.as_slice(),
            [(7, AppReply::Error(gallocy_core::AppError::InvalidFree))]
        ),
        "{got:?}"
    );
    let allocator = node.allocator(space).expect("the creator carves chunk 0");
    allocator.check_invariants().unwrap();
}

#[test]
fn an_exact_fit_takes_the_last_chunk() {
    let mut node = Node::new(Config::new(1, vec![1])).unwrap();
    node.tick(1);
    // Two chunks: chunk 0 is all root block, chunk 1 is the only one left.
    node.handle_request(
        1,
        1,
        AppRequest::CreateSpace {
            name: "two".into(),
            base_addr: 0x1000_0000_0000,
            size_bytes: 128 << 10,
            chunk_size_bytes: 64 << 10,
            flexible_base: false,
            persistent: false,
            replicas: 2,
        },
    );
    let space = match replies(&mut node).pop() {
        Some((1, AppReply::Space(layout))) => layout.id,
        other => panic!("unexpected {other:?}"),
    };
    node.handle_request(
        2,
        2,
        AppRequest::Allocate {
            space,
            size_bytes: 64 << 10,
            align_bytes: 16,
        },
    );
    let got = replies(&mut node);
    assert!(
        matches!(got.as_slice(), [(2, AppReply::Allocated { addr, .. })] if *addr == 0x1000_0001_0000),
        "{got:?}"
    );
}
