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
                let members = marked(&g.members, &g.idp_members);
                t.row(vec![g.name, members]);
            }
            t.print("No groups.")?;
            return ok();
        }
        GroupsCmd::Delete { name } => {
            api.delete(&["v1", "groups", &name]).await?;
            if !ctx.json {
                crate::outln!("Deleted group {name}.");
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
            let done = format!(
                "Added {user} to group {group} (a membership added here stays: single sign-on logins do not remove it)."
            );
            (g, done)
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
        crate::outln!("{done}");
        crate::outln!("Members: {}", marked(&group.members, &group.idp_members));
    }
    ok()
}

/// `names`, those also in `from_idp` marked `(sso)`: memberships an identity provider's groups
/// claim manages.
pub(crate) fn marked(names: &[String], from_idp: &[String]) -> String {
    let shown: Vec<String> = names
        .iter()
        .map(|n| {
            if from_idp.contains(n) {
                format!("{n} (sso)")
            } else {
                n.clone()
            }
        })
        .collect();
    list(&shown)
}
