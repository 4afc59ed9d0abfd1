/**
 * A strict little XML 1.0 parser for the tests (no dependency): it checks well-formedness — one root element,
 * balanced tags, quoted and unique attributes, only the predefined and numeric entities, comments without `--`,
 * declared namespace prefixes — and returns the element tree. Enough for the SCXML exports; no DTDs, no CDATA.
 */

export interface XmlElement {
  readonly name: string;
  readonly attrs: Readonly<Record<string, string>>;
  readonly children: XmlElement[];
  readonly parent?: XmlElement;
  /** Namespace URI of the element (from xmlns / xmlns:prefix declarations in scope). */
  readonly ns: string | undefined;
}

const NAME = '[A-Za-z_][A-Za-z0-9_.:-]*';
const ENTITIES: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };

function decode(text: string, where: string): string {
  return text.replace(/&([^;]*);?/g, (all, ref: string) => {
    if (!all.endsWith(';')) throw new Error(`XML: bare & in ${where}`);
    if (ENTITIES[ref] !== undefined) return ENTITIES[ref];
    const m = /^#(x[0-9A-Fa-f]+|[0-9]+)$/.exec(ref);
    if (!m) throw new Error(`XML: unknown entity &${ref}; in ${where}`);
    return String.fromCodePoint(m[1].startsWith('x') ? parseInt(m[1].slice(1), 16) : parseInt(m[1], 10));
  });
}

export function parseXml(text: string): XmlElement {
  let i = 0;
  const fail = (msg: string): never => {
    throw new Error(`XML: ${msg} at offset ${i}: ${JSON.stringify(text.slice(i, i + 40))}`);
  };
  if (text.startsWith('<?xml')) {
    const end = text.indexOf('?>');
    if (end < 0) fail('unterminated XML declaration');
    if (!/^<\?xml\s+version="1\.[0-9]"(\s+encoding="[A-Za-z0-9_.-]+")?\s*\?>$/.test(text.slice(0, end + 2))) fail('bad XML declaration');
    i = end + 2;
  }
  let root: XmlElement | undefined;
  const stack: Array<XmlElement & { nsMap: Map<string, string> }> = [];
  while (i < text.length) {
    if (text.startsWith('<!--', i)) {
      const end = text.indexOf('-->', i + 4);
      if (end < 0) fail('unterminated comment');
      if (text.slice(i + 4, end).includes('--')) fail('-- inside a comment');
      i = end + 3;
    } else if (text.startsWith('</', i)) {
      const m = new RegExp(`^</(${NAME})\\s*>`).exec(text.slice(i));
      if (!m) fail('bad end tag');
      const open = stack.pop();
      if (!open || open.name !== m![1]) fail(`end tag </${m![1]}> does not match <${open?.name}>`);
      i += m![0].length;
    } else if (text[i] === '<') {
      const m = new RegExp(`^<(${NAME})((?:\\s+${NAME}\\s*=\\s*(?:"[^"<]*"|'[^'<]*'))*)\\s*(/?)>`).exec(text.slice(i));
      if (!m) fail('bad start tag');
      if (stack.length === 0 && root) fail('a second root element');
      const attrs: Record<string, string> = {};
      for (const a of m![2].matchAll(new RegExp(`(${NAME})\\s*=\\s*(?:"([^"]*)"|'([^']*)')`, 'g'))) {
        if (attrs[a[1]] !== undefined) fail(`attribute ${a[1]} twice`);
        attrs[a[1]] = decode(a[2] ?? a[3], `attribute ${a[1]}`);
      }
      const parent = stack[stack.length - 1];
      const nsMap = new Map(parent?.nsMap ?? []);
      for (const [k, v] of Object.entries(attrs)) {
        if (k === 'xmlns') nsMap.set('', v);
        else if (k.startsWith('xmlns:')) nsMap.set(k.slice(6), v);
      }
      const name = m![1];
      const prefix = name.includes(':') ? name.slice(0, name.indexOf(':')) : '';
      if (prefix !== '' && !nsMap.has(prefix)) fail(`undeclared namespace prefix ${prefix}`);
      for (const k of Object.keys(attrs)) {
        const p = k.includes(':') ? k.slice(0, k.indexOf(':')) : '';
        if (p !== '' && p !== 'xmlns' && p !== 'xml' && !nsMap.has(p)) fail(`undeclared namespace prefix ${p}`);
      }
      const el = { name, attrs, children: [] as XmlElement[], parent, ns: nsMap.get(prefix), nsMap };
      if (parent) parent.children.push(el);
      else root = el;
      if (m![3] !== '/') stack.push(el);
      i += m![0].length;
    } else {
      const end = text.indexOf('<', i);
      const chunk = text.slice(i, end < 0 ? text.length : end);
      if (stack.length === 0 && chunk.trim() !== '') fail('text outside the root element');
      decode(chunk, 'text');
      i += chunk.length;
    }
  }
  if (stack.length > 0) fail(`unclosed <${stack[stack.length - 1].name}>`);
  if (!root) fail('no root element');
  return root!;
}

/** Every element of the tree, depth first. */
export function allElements(el: XmlElement): XmlElement[] {
  return [el, ...el.children.flatMap(allElements)];
}
