# One version everywhere: the newest released CHANGELOG section, the rockspec (file name, version, source tag),
# _VERSION of resty.autoscale (which opm reads), the workspace crates (Cargo.toml, Cargo.lock); and the packaging
# files install every module: the rockspec uses `make install` (no module list of its own that could drift from
# lua/), dist.ini ships all of lua/.
use strict;
use warnings;
use lib 't/lib';
use Test::More;
use ScratchNginx qw(repo_root);

my $repo = repo_root();
sub slurp { ScratchNginx::slurp("$repo/$_[0]") }

my ($version, $date) = slurp('CHANGELOG.md') =~ /^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$/m;
ok($version, "CHANGELOG has a released section ($version, $date)");
like(slurp('CHANGELOG.md'), qr/\A(?:(?!^## ).)*^## \[Unreleased\]\n(?:(?!^## ).)*^## \[\Q$version\E\]/ms,
    'an Unreleased section comes first, then the newest release');

my @rockspecs = map { s{^.*/}{}r } glob "$repo/*.rockspec";
is_deeply(\@rockspecs, ["lua-resty-autoscale-$version-1.rockspec"], 'one rockspec, named for the version');
my $rs = slurp("lua-resty-autoscale-$version-1.rockspec");
like($rs, qr/^version = "\Q$version\E-1"$/m, 'rockspec version');
like($rs, qr/^\s*tag = "v\Q$version\E",$/m, 'rockspec source tag');
like($rs, qr/^\s*type = "make",$/m, 'rockspec builds and installs with make (make lib, make install)');
unlike($rs, qr/"lua >= 5\.1"/, 'rockspec does not claim any Lua >= 5.1 will do');
like($rs, qr/LuaJIT/, 'rockspec says what it really needs (LuaJIT)');
like($rs, qr/lua-resty-core/, 'rockspec says what it really needs (lua-resty-core)');
unlike($rs, qr/\["resty\.autoscale/, 'rockspec keeps no module list of its own');

like(slurp('lua/resty/autoscale.lua'), qr/_VERSION = "\Q$version\E"/, 'resty.autoscale _VERSION');

my $cargo = slurp('Cargo.toml');
like($cargo, qr/^\[workspace\.package\]\nversion = "\Q$version\E"$/m, 'workspace version in Cargo.toml');
for my $toml ('Cargo.toml', 'rust-core/Cargo.toml') {
    like(slurp($toml), qr/^\[package\](?:(?!^\[).)*^version\.workspace = true$/ms, "$toml takes the workspace version");
}
my $lock = slurp('Cargo.lock');
for my $crate ('resty-autoscale', 'autoscale-core') {
    like($lock, qr/^name = "\Q$crate\E"\nversion = "\Q$version\E"$/m, "Cargo.lock: $crate $version");
}

my $dist = slurp('dist.ini');
like($dist, qr/^lib_dir = lua$/m, 'dist.ini ships all of lua/');
like($dist, qr/^main_module = lua\/resty\/autoscale\.lua$/m, 'dist.ini takes the version from resty.autoscale');
like($dist, qr/^repo_link = (\S+)$/m, 'dist.ini names the repository');
my ($repo_link) = $dist =~ /^repo_link = (\S+)$/m;
like($rs, qr/url = "git\+\Q$repo_link\E\.git"/, 'rockspec source is the same repository');
done_testing();
