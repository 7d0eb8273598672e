//! `postern groups ...`.

use std::process::ExitCode;

use anyhow::Result;

use postern_controller::api::types::{AddMember, CreateGroup, Group};

use super::{ok, Ctx};
use crate::args::GroupsCmd;
use crate::output::{list, print_json, Table};

/// Runs a `groups` subcommand.
pub async fn run(ctx: &Ctx, cmd: GroupsCmd) -> Result<ExitCode> {
    let api = ctx.api()?;
    let (group, done): (Group, String) = match cmd {
        GroupsCmd::List => {
            let groups: Vec<Group> = api.get(&["v1", "groups"], &[]).await?;
            if ctx.json {
                print_json(&groups)?;
                return ok();
            }
            let mut t = Table::new(&["NAME", "MEMBERS"]);
            for g in groups {
                t.row(vec![g.name, list(&g.members)]);
            }
            t.print("No groups.");
            return ok();
        }
        GroupsCmd::Delete { name } => {
            api.delete(&["v1", "groups", &name]).await?;
            if !ctx.json {
                println!("Deleted group {name}.");
            }
            return ok();
        }
        GroupsCmd::Create { name } => {
            let g: Group = api.post(&["v1", "groups"], &CreateGroup { name }).await?;
            let done = format!("Created group {}.", g.name);
            (g, done)
        }
        GroupsCmd::AddMember { group, user } => {
            let g: Group = api
                .post(
                    &["v1", "groups", &group, "members"],
                    &AddMember { user: user.clone() },
                )
                .await?;
            (g, format!("Added {user} to group {group}."))
        }
        GroupsCmd::RemoveMember { group, user } => {
            let g: Group = api
                .delete_json(&["v1", "groups", &group, "members", &user])
                .await?;
            (g, format!("Removed {user} from group {group}."))
        }
    };
    if ctx.json {
        print_json(&group)?;
    } else {
        println!("{done}");
        println!("Members: {}", list(&group.members));
    }
    ok()
}
