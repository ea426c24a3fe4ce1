"""`meshd skill list|get|publish|remove`: the skills a mesh shares (docs/local-api.md).

A skill is published from a Markdown file whose optional front matter (`name:`,
`description:`, `tags:` between `---` lines) is read by the small parser below; the body is
its instructions.
"""
import os
import sys

import argh

from meshd.argh_compat import arg
from meshd.cli.output import print_json
from meshd.cli.shared_commands import (ALL_MESHES, ONE_MESH, common_options, daemon_call,
                                       mesh_option, print_unreachable, split_list, with_mesh)
from meshd.exceptions import CommandFailed, UsageError


def read_skill(path):
    """(front matter fields, instructions) of a skill file; `-` is stdin."""
    if path == '-':
        return parse_front_matter(sys.stdin.read(), 'stdin')
    try:
        with open(path, encoding='utf-8') as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError('skill publish: cannot read %s: %s' % (
            path, getattr(exc, 'strerror', None) or exc))
    return parse_front_matter(text, path)


def parse_front_matter(text, source):
    """({name, description, tags, …}, body) of Markdown with optional front matter: `key:
    value` lines between two `---` lines. A value may be quoted; a list is `a, b`, `[a, b]`
    or `- item` lines under an empty `key:`. Nothing more of YAML."""
    lines = text.lstrip('\ufeff').splitlines(keepends=True)
    if not lines or lines[0].strip() != '---':
        return {}, text.strip('\n')
    end = next((i for i in range(1, len(lines)) if lines[i].strip() in ('---', '...')), None)
    if end is None:
        raise UsageError('skill publish: %s: the front matter opened by --- is never closed'
                         % source)
    fields, last = {}, None
    for number, line in enumerate(lines[1:end], 2):
        stripped = line.strip()
        if not stripped or stripped.startswith('#'):
            continue
        if stripped.startswith('- ') and last is not None and isinstance(fields[last], list):
            fields[last].append(_unquote(stripped[2:].strip()))
            continue
        key, colon, value = stripped.partition(':')
        if not colon or not key.strip() or ' ' in key.strip():
            raise UsageError('skill publish: %s line %d: expected "key: value", got %r'
                             % (source, number, stripped))
        last = key.strip().lower()
        value = value.strip()
        if not value:
            fields[last] = []            # `- item` lines may follow
        elif value.startswith('[') and value.endswith(']'):
            fields[last] = [_unquote(v.strip()) for v in value[1:-1].split(',') if v.strip()]
        else:
            fields[last] = _unquote(value)
    return fields, ''.join(lines[end + 1:]).strip('\n')


def _unquote(value):
    if len(value) >= 2 and value[0] == value[-1] and value[0] in '"\'':
        return value[1:-1]
    return value


def _text(value):
    return ', '.join(value) if isinstance(value, list) else value


def _skill_name(path):
    """A skill's name from its file: the stem, or the directory of a `SKILL.md`."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem.lower() == 'skill':
        stem = os.path.basename(os.path.dirname(os.path.abspath(path))) or stem
    return stem


@argh.named('list')
@arg('query', nargs='?', default=None, help='only skills whose name, description or tags '
                                            'contain this')
@mesh_option(ALL_MESHES)
@common_options
def skill_list(query, *, mesh=None, json=False, no_spawn=False):
    """List the mesh's skills: name, description, tags, author."""
    params = with_mesh({'query': query} if query else {}, mesh)
    result = daemon_call('skill list', 'skills.list', params, no_spawn)
    if json:
        print_json(result)
        return
    skills = result.get('skills') or []
    if not skills:
        print('(no skills%s)' % (' match "%s"' % query if query else ''))
    for skill in skills:
        tags = ' [%s]' % ', '.join(skill['tags']) if skill.get('tags') else ''
        print('%s — %s%s (by %s on %s)' % (skill.get('name'), skill.get('description') or '',
                                            tags, skill.get('author') or '-', skill.get('mesh')))
    print_unreachable(result)


@argh.named('get')
@arg('name', help='the skill')
@mesh_option(ALL_MESHES)
@common_options
def skill_get(name, *, mesh=None, json=False, no_spawn=False):
    """Print a skill's instructions (--json: the whole skill)."""
    result = daemon_call('skill get', 'skills.get', with_mesh({'name': name}, mesh), no_spawn)
    if json:
        print_json(result)
    else:
        print((result['skill'].get('instructions') or '').rstrip('\n'))


@argh.named('publish')
@arg('file', help='a Markdown file, with front matter (name:, description:, tags:) or not; '
                  '- reads stdin')
@arg('--name', default=None, help="the skill's name; without it, the front matter's, else "
                                  "the file's stem")
@arg('--description', default=None, help='one line on what it is for')
@arg('--tag', default=None, action='append', help='a tag (repeat it, or a,b,c)')
@mesh_option(ONE_MESH)
@common_options
def skill_publish(file, *, name=None, description=None, tag=None, mesh=None, json=False,
                  no_spawn=False):
    """Publish a skill to the mesh (the same name replaces it)."""
    fields, instructions = read_skill(file)
    name = name or _text(fields.get('name')) or (_skill_name(file) if file != '-' else None)
    if not name:
        raise UsageError('skill publish: no name — give --name or a name: line')
    if not instructions.strip():
        raise UsageError('skill publish: %s has no instructions after its front matter'
                         % ('stdin' if file == '-' else file))
    params = {'name': name, 'instructions': instructions}
    description = description or _text(fields.get('description'))
    if description:
        params['description'] = description
    tags = split_list(tag) or split_list([_text(fields.get('tags') or '')])
    if tags:
        params['tags'] = tags
    result = daemon_call('skill publish', 'skills.publish', with_mesh(params, mesh), no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ published skill %s on %s' % (result.get('name') or name, result.get('mesh')))


@argh.named('remove')
@arg('name', help='the skill')
@mesh_option(ONE_MESH)
@common_options
def skill_remove(name, *, mesh=None, json=False, no_spawn=False):
    """Remove a skill from the mesh (exit 1 when it was not there)."""
    result = daemon_call('skill remove', 'skills.remove', with_mesh({'name': name}, mesh),
                         no_spawn)
    if json:
        print_json(result)
    if not result.get('removed'):
        raise CommandFailed('skill remove: no skill "%s" on %s' % (name, result.get('mesh')))
    if not json:
        print('✔ removed skill %s from %s' % (name, result.get('mesh')))


SKILL_COMMANDS = [skill_list, skill_get, skill_publish, skill_remove]
