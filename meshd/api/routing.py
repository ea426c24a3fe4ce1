"""Which mesh, and which link, a call on shared data goes to (docs/local-api.md).

A caller attached to a session with a presence acts as that session on its mesh; any
other caller acts as the daemon's member link. Reads that name no mesh and have no session
go to every joined mesh at once, each within the link's own timeout, and say which meshes
did not answer; when none answered, the first failure is the answer.
"""
import gevent
from rpc.protocol import NOT_FOUND, UPSTREAM_ERROR, RpcError

from meshd.greenlets import LOG


class Routes:
    """Mesh and link choice over `links` (the LinkTable); `one_mesh(session, mesh)` is the
    send path's choice of a single mesh (meshd/resolver.py); `supervisor` runs the
    concurrent reads."""

    def __init__(self, links, one_mesh, supervisor, timings):
        self.links = links
        self.one_mesh = one_mesh
        self.supervisor = supervisor
        self.timings = timings

    def one(self, ctx, mesh):
        """The single mesh of a write: explicit, the session's, or the only joined one."""
        return self.one_mesh(ctx.session, mesh.strip() if isinstance(mesh, str) else None)

    def many(self, ctx, mesh):
        """The meshes of a read or a presence setting: explicit, the session's, or all."""
        if isinstance(mesh, str) and mesh.strip():
            slug = mesh.strip()
            if slug not in self.links.meshes:
                raise RpcError.of(NOT_FOUND, 'mesh_not_attached', 'mesh not attached: %s' % slug,
                                  mesh=slug)
            return [slug]
        session = ctx.session
        if session is not None and session.mesh in self.links.meshes:
            return [session.mesh]
        return sorted(self.links.meshes)

    def link(self, ctx, slug):
        """The caller's link on `slug`: its session's, else the member link (or None)."""
        session = ctx.session
        if session is not None and session.presence is not None and session.mesh == slug:
            link = self.links.sessions.get(session.token)
            if link is not None:
                return link
        return self.links.member(slug)

    def each(self, ctx, slugs, fn):
        """Run `fn(link, slug)` for every slug concurrently: ({slug: result}, {slug: error})."""
        jobs = {slug: self.supervisor.spawn('call:%s' % slug, _capture, fn,
                                            self.link(ctx, slug), slug, on_crash=LOG)
                for slug in slugs}
        gevent.joinall(list(jobs.values()), timeout=self.timings['link_rpc_timeout'] + 2)
        results, errors = {}, {}
        for slug, job in jobs.items():
            outcome = job.value if job.successful() else None
            if isinstance(outcome, RpcError):
                errors[slug] = outcome
            elif isinstance(outcome, tuple):
                results[slug] = outcome[0]
            else:
                errors[slug] = RpcError.of(UPSTREAM_ERROR, 'broker_timeout', 'no answer from mesh "%s"'
                                           % slug, mesh=slug, retryable=True)
        return results, errors

    def read(self, ctx, slugs, fn):
        """`each`, for a read: ({slug: result} in slug order, unreachable slugs); raises the
        first error when no mesh answered. A refusal of the broker is never hidden."""
        results, errors = self.each(ctx, slugs, fn)
        for slug in sorted(errors):
            if errors[slug].data.get('code') not in ('broker_unreachable', 'broker_timeout',
                                                     'unsupported_by_broker'):
                raise errors[slug]
        if slugs and not results:
            raise errors[sorted(errors)[0]]
        return {slug: results[slug] for slug in sorted(results)}, sorted(errors)


def _capture(fn, link, slug):
    """(result,) or the RpcError `fn` raised, so a failed mesh never ends the others."""
    try:
        return (fn(link, slug),)
    except RpcError as exc:
        return exc
